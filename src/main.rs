//! `parley`: the single binary. Everything lives in the library; see `parley --help`.

fn main() -> std::process::ExitCode {
    parley::cli::run()
}
