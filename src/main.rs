//! `parley`: the single binary. Everything lives in the library; see `parley --help`.

// A callback allocates and frees dozens of small buffers across threads (HTTP, JSON, AMQP
// frames); mimalloc's per-thread free lists cost a fraction of glibc malloc's locking.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    parley::cli::run()
}
