//! The `spliced` binary: parses the command line, picks the data plane, binds
//! the listeners and runs the control plane until SIGINT or SIGTERM.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use spliced::{access_log::AccessLog, config::Config, control, dataplane};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log::error!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let access_log = AccessLog::open(&config.access_log, config.log_format)
        .with_context(|| format!("opening access log {}", config.access_log.display()))?;
    let (dataplane, why) = dataplane::select(&config)?;
    log::info!("data plane: {} ({why})", dataplane.name());

    let mut listeners = Vec::new();
    for addr in config.listen_addrs() {
        match control::bind(addr) {
            Ok(listener) => listeners.push(listener),
            // The default pair includes [::]; a host without IPv6 still serves IPv4.
            Err(err) if config.listen.is_empty() && addr.is_ipv6() => {
                log::warn!("not listening on {addr}: {err}");
            }
            Err(err) => return Err(err).with_context(|| format!("binding {addr}")),
        }
    }
    let control = Arc::new(control::ControlPlane::new(
        config,
        dataplane.clone(),
        access_log,
    ));
    for listener in listeners {
        log::info!("listening on {}", listener.local_addr()?);
        tokio::spawn(control.clone().serve(listener));
    }

    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = usr1.recv() => log::info!("stats: dataplane={} {}", dataplane.name(), dataplane.stats()),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    log::info!("shutting down");
    Ok(())
}
