//! The `spliced` binary: reads the command line and configuration, picks the
//! data plane, binds the listeners and runs the control plane. SIGHUP reloads
//! the configuration, SIGTERM drains and stops, SIGUSR1 logs kernel counters.
//! With `--admin` it first starts the admin listener, whose `/readyz` says ready
//! only between the listeners being bound and SIGTERM.

use std::{collections::HashMap, io, net::SocketAddr, path::Path, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use spliced::{
    admin::{self, AdminState, Readiness},
    config::{Command, Config, TestHook},
    control::{self, Active, ControlPlane},
    dataplane,
    metrics::Metrics,
    settings::{Resolved, Settings},
    squid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinHandle,
};

fn main() -> ExitCode {
    let config = Config::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let check_file = match (&config.command, config.check) {
        (Some(Command::Check { file }), _) => Some(file.clone()),
        (None, true) => match &config.config_file {
            Some(file) => Some(file.clone()),
            None => {
                log::error!("--check needs -f FILE");
                return ExitCode::FAILURE;
            }
        },
        (None, false) => None,
    };
    if let Some(file) = check_file {
        return check(&file);
    }
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

/// `spliced check -f FILE`: like `squid -k parse`.
fn check(file: &Path) -> ExitCode {
    match squid::load(file) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("WARNING: {warning}");
            }
            print!("{}", loaded.config.render_effective());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("ERROR: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves settings and opens their access log; logs the file's warnings.
fn activate(config: &Config) -> anyhow::Result<Active> {
    let Resolved { settings, warnings } = Settings::resolve(config)?;
    for warning in warnings {
        log::warn!("{warning}");
    }
    let access_log = settings.open_access_log()?;
    Ok(Active {
        settings,
        access_log,
    })
}

/// The listening sockets in use, by address.
#[derive(Default)]
struct Listeners {
    running: HashMap<SocketAddr, JoinHandle<()>>,
    /// The address each configured one was bound to (port 0 picks one).
    bound: HashMap<SocketAddr, SocketAddr>,
}

impl Listeners {
    /// Binds what `settings` lists and is not bound yet, and stops listening on
    /// the rest. Open connections are untouched either way. On an error nothing
    /// changes, as far as the kernel lets it (see below).
    async fn reconcile(
        &mut self,
        control: &Arc<ControlPlane>,
        settings: &Settings,
    ) -> anyhow::Result<()> {
        let removed: Vec<SocketAddr> = self
            .running
            .keys()
            .filter(|a| !settings.listen.contains(a))
            .copied()
            .collect();
        let mut bound = Vec::new();
        let mut blocked = Vec::new();
        for &addr in settings
            .listen
            .iter()
            .filter(|a| !self.running.contains_key(a))
        {
            match control::bind(addr) {
                Ok(listener) => bound.push((addr, listener)),
                // 127.0.0.1:P cannot be bound while 0.0.0.0:P listens (and the
                // reverse): retry once the listeners being removed are closed.
                Err(err)
                    if err.kind() == io::ErrorKind::AddrInUse
                        && removed.iter().any(|r| r.port() == addr.port()) =>
                {
                    blocked.push(addr);
                }
                // The default pair includes [::]; a host without IPv6 serves IPv4.
                Err(err) if settings.listen_is_default && addr.is_ipv6() => {
                    log::warn!("not listening on {addr}: {err}");
                }
                Err(err) => return Err(err).with_context(|| format!("binding {addr}")),
            }
        }
        for addr in &removed {
            self.stop_one(control, *addr).await;
        }
        for addr in blocked {
            match control::bind(addr) {
                Ok(listener) => bound.push((addr, listener)),
                Err(err) => {
                    // Put the old listeners back before reporting.
                    for old in removed {
                        if let Ok(listener) = control::bind(old) {
                            self.start_one(control, old, listener);
                        }
                    }
                    return Err(err).with_context(|| format!("binding {addr}"));
                }
            }
        }
        for (addr, listener) in bound {
            self.start_one(control, addr, listener);
        }
        Ok(())
    }

    fn start_one(
        &mut self,
        control: &Arc<ControlPlane>,
        addr: SocketAddr,
        listener: tokio::net::TcpListener,
    ) {
        let bound = listener.local_addr().unwrap_or(addr);
        log::info!("listening on {bound}");
        control.add_own_addr(bound);
        self.running
            .insert(addr, tokio::spawn(control.clone().serve(listener, addr)));
        self.bound.insert(addr, bound);
    }

    /// Stops accepting on `addr` and waits until its socket is closed.
    async fn stop_one(&mut self, control: &ControlPlane, addr: SocketAddr) {
        if let Some(bound) = self.bound.remove(&addr) {
            control.remove_own_addr(bound);
        }
        if let Some(task) = self.running.remove(&addr) {
            task.abort();
            // The listener is dropped, and so closed, once the task has ended.
            let _ = task.await;
            log::info!("no longer listening on {addr}");
        }
    }

    async fn stop(&mut self, control: &ControlPlane) {
        let addrs: Vec<SocketAddr> = self.running.keys().copied().collect();
        for addr in addrs {
            self.stop_one(control, addr).await;
        }
    }
}

/// Starts the admin listener on `addr`.
async fn start_admin(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SocketAddr> {
    let listener = admin::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener {addr}"))?;
    log::info!(
        "admin endpoint on http://{}/ (healthz, readyz, metrics)",
        listener.local_addr().unwrap_or(addr)
    );
    let bound = listener.local_addr().unwrap_or(addr);
    let state = Arc::new(AdminState { readiness, metrics });
    tokio::spawn(admin::serve(listener, state));
    Ok(bound)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new("starting: loading the configuration"));
    let admin_addr = match config.admin {
        Some(addr) => Some(start_admin(addr, readiness.clone(), metrics.clone()).await?),
        None => None,
    };
    let active = activate(&config)?;
    readiness.set_not_ready("starting: choosing the data plane");
    let (dataplane, why) = dataplane::select(&config)?;
    log::info!("data plane: {} ({why})", dataplane.name());
    metrics.dataplane_chosen(dataplane.clone());
    let settings = active.settings.clone();
    let control = Arc::new(ControlPlane::new(
        active,
        dataplane.clone(),
        config.hooks(),
        metrics.clone(),
    ));
    if let Some(addr) = admin_addr {
        control.add_own_addr(addr);
    }
    for adopted in dataplane.adopted() {
        tokio::spawn(spliced::handover::follow_adopted(control.clone(), adopted));
    }
    readiness.set_not_ready("starting: binding the listeners");
    if config.hooks().has(TestHook::DelayStartup) {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    let mut listeners = Listeners::default();
    listeners.reconcile(&control, &settings).await?;
    readiness.set_ready();

    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = usr1.recv() => log::info!("stats: dataplane={} {}", dataplane.name(), dataplane.stats()),
            _ = hup.recv() => {
                let success = reload(&config, &control, &mut listeners).await;
                metrics.config_reloaded(success);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    // Graceful shutdown: stop accepting, let open tunnels finish for up to
    // shutdown_lifetime; a second SIGTERM or SIGINT ends them at once.
    readiness.set_not_ready("draining: shutting down");
    control.start_draining();
    listeners.stop(&control).await;
    let lifetime = control.active().settings.shutdown_lifetime;
    let open = control.open_connections();
    if open > 0 {
        log::info!("shutting down: waiting up to {lifetime:?} for {open} open connections");
        let forced = tokio::select! {
            () = control.all_closed() => {
                log::info!("all connections closed");
                false
            }
            () = tokio::time::sleep(lifetime) => {
                log::info!("shutdown_lifetime ({lifetime:?}) is over");
                true
            }
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        if forced {
            log::info!("closing {} connections", control.open_connections());
            control.close_all();
            // Each closed connection still writes its access log line.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), control.all_closed()).await;
        }
    }
    log::info!("shut down");
    Ok(())
}

/// SIGHUP: new settings for new connections; established tunnels keep flowing;
/// a configuration that fails leaves the old one in force. Says whether the new
/// one is in force.
async fn reload(config: &Config, control: &Arc<ControlPlane>, listeners: &mut Listeners) -> bool {
    let active = match activate(config) {
        Ok(active) => active,
        Err(err) => {
            log::error!("reload failed, keeping the configuration in force: {err:#}");
            return false;
        }
    };
    if let Err(err) = listeners.reconcile(control, &active.settings).await {
        log::error!("reload failed, keeping the configuration in force: {err:#}");
        return false;
    }
    control.replace(active);
    log::info!("configuration reloaded");
    true
}
