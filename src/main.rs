use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;
use task_api::config::Config;

/// Allocation is a tenth of the request path's CPU under glibc's allocator (perf);
/// mimalloc is faster for the many small, short-lived allocations of a web service.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Task API: a multi-user todo backend for Better Auth apps.
///
/// Configured from environment variables (and a `.env` file); see README.md.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Print a token for USER signed with the configured JWT_SECRET.
    Token {
        /// The user id the token is for (its `sub` claim).
        #[arg(long)]
        user: String,
        /// How long the token is valid, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> ExitCode {
    task_api::allocator::configure();
    let cli = Cli::parse();
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: .env: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Token { user, ttl }) => print_token(&config, &user, ttl),
        Some(Command::Serve) | None => serve(config),
    }
}

fn print_token(config: &Config, user: &str, ttl: Duration) -> ExitCode {
    let Some(secret) = &config.auth.secret else {
        eprintln!(
            "error: JWT_SECRET: not set; the token command signs with JWT_SECRET (or BETTER_AUTH_SECRET)"
        );
        return ExitCode::from(2);
    };
    match task_api::auth::mint(secret, &config.auth, user, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot sign the token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task_api::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
