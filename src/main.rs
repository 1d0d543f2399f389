//! The `exotel-sos` command: `serve` (the default), `migrate`, `check-config`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use exotel_sos::settings::Settings;
use exotel_sos::store::Store;
use exotel_sos::{load_routing, telemetry, App};

#[derive(Parser)]
#[command(
    name = "exotel-sos",
    version,
    about = "Emergency calls, SMS and WhatsApp through Exotel and GupShup"
)]
struct Cli {
    /// Settings file layered over the built-in defaults (also SOS_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the webhook server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate settings and the stakeholder file; print the routing table with masked numbers.
    CheckConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings).await,
        Command::Migrate => migrate(settings).await,
        Command::CheckConfig => return check_config(&settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    telemetry::init(&settings.log);
    let listen = settings.server.listen.clone();
    let app = App::build(settings).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    println!("exotel-sos listening on http://{addr}\n{}", app.banner());
    tracing::info!(%addr, "ready");
    app.run(listener, shutdown_signal()).await
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    telemetry::init(&settings.log);
    let store = Store::connect(&settings.database.url, 1).await?;
    store.migrate().await?;
    println!("migrations applied ({})", store.engine().as_str());
    Ok(())
}

/// Runs exactly the validation that startup runs; every problem is printed, not only the first.
fn check_config(settings: &Settings) -> ExitCode {
    match load_routing(settings) {
        Ok(routing) => {
            println!(
                "settings: ok\nstakeholder file: {} ok ({} contacts)\n",
                settings.stakeholders.file.display(),
                routing.contact_count()
            );
            for w in &routing.warnings {
                println!("warning: {w}");
            }
            print!("{}", routing.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
