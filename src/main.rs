//! The `exotel-sos` command: `serve` (the default), `migrate`, `check-config`, `trigger`, `drill`, `optin`,
//! `backup`.
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
    /// Raise an incident through the running server's API (exit codes: 0 stored, 2 no token or bad
    /// settings, 3 server unreachable, 4 token refused, 5 input refused, 1 other).
    Trigger(TriggerCmd),
    /// Fire drill: raise a marked test incident through the running server that reaches only CONTACT,
    /// on every channel they have, and print each channel's outcome (exit codes as for trigger, and 6
    /// when a channel did not reach the contact in time).
    Drill(DrillCmd),
    /// Resolve an incident through the running server's API: what has not gone out is cancelled
    /// (exit codes as for trigger, and 7 when the server has no such incident).
    Resolve(ResolveCmd),
    /// Acknowledge an incident through the running server's API: calls not yet placed are cancelled
    /// and everyone already alerted is told who has it (exit codes as for resolve).
    Ack(AckCmd),
    /// Opt every WhatsApp contact of the stakeholder file in with GupShup (OPT_IN), once per number;
    /// exits 1 if any failed.
    Optin,
    /// Write a consistent copy of the SQLite database to FILE (never overwrites; for PostgreSQL use
    /// pg_dump or pg_basebackup).
    Backup {
        /// Where to write the copy; must not exist yet.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct TriggerCmd {
    /// Emergency type, matched against the stakeholder routes (unknown types use the default route).
    #[arg(long = "type", value_name = "TYPE")]
    emergency_type: String,
    /// What happened; texted and spoken to every contact.
    #[arg(long)]
    message: String,
    /// An http(s) audio file that calls play instead of the spoken message.
    #[arg(long, value_name = "URL")]
    audio_url: Option<String>,
    /// While an incident with this key is open, triggering again sends nothing new. Default: a new
    /// key per run, so that the command's own retries never alert twice.
    #[arg(long, value_name = "KEY")]
    dedup_key: Option<String>,
    /// Server base URL, http:// or https:// (default: server.public_url).
    #[arg(long, value_name = "URL", value_parser = exotel_sos::cli::server_url)]
    server: Option<String>,
    /// Admin token (default: server.admin_token, else the one stored in the database).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(clap::Args)]
struct ResolveCmd {
    /// The incident's id (as the API, the console and `trigger` show it).
    #[arg(value_name = "INCIDENT_ID")]
    incident_id: String,
    /// Server base URL, http:// or https:// (default: server.public_url).
    #[arg(long, value_name = "URL", value_parser = exotel_sos::cli::server_url)]
    server: Option<String>,
    /// Admin token (default: server.admin_token, else the one stored in the database).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(clap::Args)]
struct AckCmd {
    /// The incident's id (as the API, the console and `trigger` show it).
    #[arg(value_name = "INCIDENT_ID")]
    incident_id: String,
    /// Who acknowledges (default: user@host).
    #[arg(long, value_name = "NAME")]
    by: Option<String>,
    /// Server base URL, http:// or https:// (default: server.public_url).
    #[arg(long, value_name = "URL", value_parser = exotel_sos::cli::server_url)]
    server: Option<String>,
    /// Admin token (default: server.admin_token, else the one stored in the database).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(clap::Args)]
struct DrillCmd {
    /// The contact to reach, by name as in the stakeholder file.
    #[arg(long, value_name = "NAME")]
    contact: String,
    /// Longest wait for the outcomes, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    wait: u64,
    /// Server base URL, http:// or https:// (default: server.public_url).
    #[arg(long, value_name = "URL", value_parser = exotel_sos::cli::server_url)]
    server: Option<String>,
    /// Admin token (default: server.admin_token, else the one stored in the database).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
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
        Command::Trigger(t) => return trigger(&settings, t).await,
        Command::Drill(d) => {
            let args = exotel_sos::cli::DrillArgs {
                contact: d.contact,
                wait: std::time::Duration::from_secs(d.wait),
                server: d.server,
                token: d.token,
            };
            return ExitCode::from(exotel_sos::cli::drill(&settings, args).await);
        }
        Command::Resolve(r) => {
            let args = exotel_sos::cli::ResolveArgs {
                incident_id: r.incident_id,
                server: r.server,
                token: r.token,
            };
            return ExitCode::from(exotel_sos::cli::resolve(&settings, args).await);
        }
        Command::Ack(a) => {
            let args = exotel_sos::cli::AckArgs {
                incident_id: a.incident_id,
                by: a.by,
                server: a.server,
                token: a.token,
            };
            return ExitCode::from(exotel_sos::cli::ack(&settings, args).await);
        }
        Command::Optin => return ExitCode::from(exotel_sos::cli::optin(&settings).await),
        Command::Backup { file } => backup(settings, &file).await,
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
    for warning in app.warnings() {
        tracing::warn!(%warning, "set-up");
    }
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

async fn backup(settings: Settings, file: &std::path::Path) -> anyhow::Result<()> {
    // Refused before connecting: a PostgreSQL URL is not an error of the database, and the operator
    // needs to hear which tool to use instead.
    if exotel_sos::store::Engine::of_url(&settings.database.url)?
        != exotel_sos::store::Engine::Sqlite
    {
        anyhow::bail!(
            "backup copies SQLite databases only; back up PostgreSQL with pg_dump (a logical copy) \
             or pg_basebackup with WAL archiving (point-in-time recovery)"
        );
    }
    let store = Store::connect(&settings.database.url, 1).await?;
    // A mistyped path with mode=rwc opens a new empty database: refuse to back that up as if it were ours.
    anyhow::ensure!(
        store.is_migrated().await.unwrap_or(false),
        "{} holds no exotel-sos database (run migrate, or check database.url)",
        settings.database.url
    );
    store.backup_sqlite(file).await?;
    store.close().await;
    println!("backup written to {}", file.display());
    Ok(())
}

/// Runs exactly the validation that startup runs; every problem is printed, not only the first. Then
/// each message kind's SMS template as it must be registered with DLT: its problems are errors while
/// SMS is live (operators would refuse every such message), warnings otherwise.
fn check_config(settings: &Settings) -> ExitCode {
    let mut ok = match load_routing(settings) {
        Ok(routing) => {
            println!(
                "settings: ok\nstakeholder file: {} ok ({} contacts)\n",
                settings.stakeholders.file.display(),
                routing.contact_count()
            );
            for w in &routing.warnings {
                println!("warning: {w}");
            }
            let live = exotel_sos::domain::Channel::ALL
                .into_iter()
                .any(|c| settings.channel_live(c));
            if let Some(w) = exotel_sos::stakeholders::unreached_warning(&routing, live) {
                println!("warning: {w}");
            }
            print!("{}", routing.describe());
            let policies = routing.describe_escalation(settings.ack.deadline_secs());
            if !policies.is_empty() {
                print!("Escalation:\n{policies}");
            }
            true
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            false
        }
    };
    let dlt = exotel_sos::messages::dlt::check(settings);
    println!("\n{}", dlt.text);
    for w in dlt.all_warnings() {
        println!("warning: {w}");
    }
    for e in dlt.errors() {
        eprintln!("error: {e}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn trigger(settings: &Settings, t: TriggerCmd) -> ExitCode {
    let args = exotel_sos::cli::TriggerArgs {
        emergency_type: t.emergency_type,
        message: t.message,
        audio_url: t.audio_url,
        dedup_key: t.dedup_key,
        server: t.server,
        token: t.token,
    };
    ExitCode::from(exotel_sos::cli::trigger(settings, args).await)
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
