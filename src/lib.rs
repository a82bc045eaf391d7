//! The `parley` binary's library: command-line dispatch (`cli`), the application that wires
//! configuration to the seams and runs the ingress and worker roles (`app`), the admin
//! endpoints (`admin`), logging set-up (`telemetry`) and the guided demo (`demo`). The
//! protocol fakes and load generators live in the `parley-sim` crate (`sim`), which `parley
//! demo`, `parley sim` and the tests use. `main.rs` only calls [`cli::run`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod demo;
pub mod telemetry;
