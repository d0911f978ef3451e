//! The `quotad-bench` binary (also run as `quotad bench`): parse the arguments, run, print.

use std::process::ExitCode;

use clap::Parser;

/// The same allocator as the daemon, so the client side costs what it costs next to it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// quotad's load generator.
#[derive(Parser)]
#[command(name = "quotad-bench", version, about)]
struct Cli {
    #[command(flatten)]
    args: quotad_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match quotad_bench::run(&cli.args).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quotad bench: {e}");
            ExitCode::from(2)
        }
    }
}
