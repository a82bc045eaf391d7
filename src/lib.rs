//! The `parley` binary's library: command-line dispatch (`cli`), the application that wires
//! configuration to the seams and runs the ingress and worker roles (`app`), the admin
//! endpoints (`admin`), logging set-up (`telemetry`), the guided demo (`demo`) and the
//! protocol fakes and load generator (`sim`). `main.rs` only calls [`cli::run`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod demo;
pub mod sim;
pub mod telemetry;
