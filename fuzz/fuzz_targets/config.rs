//! Fuzzes the configuration loader: TOML text → `${VAR}` interpolation → typed settings →
//! validation. A configuration is trusted input, but a malformed one must end in a
//! `ConfigError`, never a panic. Run:
//!   cargo +nightly fuzz run config -- -max_total_time=60

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::config::Settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Settings::from_toml(text, |name| (name == "SET").then(|| "value".to_string()));
});
