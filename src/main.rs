//! The `shers` binary: parses the command line and hands over to [`shers::cli::run`].

use clap::Parser as _;

/// mimalloc instead of glibc malloc: the ingest hot path allocates and frees many small
/// buffers across threads, where glibc spent about a quarter of the CPU (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = shers::cli::Cli::parse();
    match actix_web::rt::System::new().block_on(shers::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
