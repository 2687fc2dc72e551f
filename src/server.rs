//! Starting a server: open storage, build services, bind, serve. Used by `main` and by tests,
//! which start servers in-process on 127.0.0.1:0.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::oneshot;

use crate::{config::Config, service::Services, storage::Storage};

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    /// Where the TLS listener is, when `[global.tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    pub services: Arc<Services>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    tls_shutdown: tokio::sync::watch::Sender<bool>,
    tls_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    sender_shutdown: tokio::sync::watch::Sender<bool>,
    sender_task: Option<tokio::task::JoinHandle<()>>,
    /// The appservice transaction task (stops with the federation sender's signal).
    appservice_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop accepting, finish in-flight requests, flush the database.
    pub async fn stop(mut self) -> anyhow_like::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.tls_shutdown.send(true);
        if let Some(t) = self.tls_task.take() {
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (&mut self.task)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // The federation sender stops its workers (queued items stay queued for the next start).
        let _ = self.sender_shutdown.send(true);
        if let Some(t) = self.appservice_task.take() {
            let _ = t.await;
        }
        if let Some(t) = self.sender_task.take() {
            t.await.map_err(|e| e.to_string())?;
        }
        // Contacts counted since the last periodic write go to the register now.
        self.services.register.flush().map_err(|e| e.to_string())?;
        self.services.storage.flush().map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, String>;
}

/// Open the database and start serving on the configured address.
pub async fn start(config: Config) -> anyhow_like::Result<Running> {
    let storage = Storage::open_with(
        &config.database_path,
        config.db_cache_capacity_mb,
        config.database_sync_writes,
        config.rocksdb_compression_algo == "lz4",
    )
    .map_err(|e| e.to_string())?;
    // Schema version: a newer database is refused, an older one backed up and migrated.
    crate::storage::schema::prepare(
        &storage,
        &config.database_path,
        config.backup_path.as_deref(),
    )?;
    let services = Services::build(config, storage).map_err(|e| e.to_string())?;
    start_with(services).await
}

pub async fn start_with(services: Arc<Services>) -> anyhow_like::Result<Running> {
    let addr = SocketAddr::new(services.config.address, services.config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = oneshot::channel::<()>();
    // Push delivery ends by itself once the services are gone.
    tokio::spawn(crate::service::push::gateway::run(
        Arc::downgrade(&services),
        services.push.pending.clone(),
    ));
    // The register's flushes and the audit log's retention; end once the services are gone.
    tokio::spawn(crate::policy::register::run_jobs(Arc::downgrade(&services)));
    // The retention purge job ends by itself once the services are gone.
    tokio::spawn(crate::service::retention::run(Arc::downgrade(&services)));
    // Scheduled backups (`backup_interval_secs`); ends once the services are gone.
    tokio::spawn(crate::service::backup::run_schedule(Arc::downgrade(
        &services,
    )));
    tokio::spawn(crate::policy::group_sweep::run_at_start(Arc::downgrade(
        &services,
    )));
    let (sender_shutdown, sender_stop) = tokio::sync::watch::channel(false);
    let sender_task = tokio::spawn(crate::service::federation::sender::run(
        Arc::downgrade(&services),
        sender_stop,
    ));
    let appservice_task = tokio::spawn(crate::service::appservice::queue::run(
        Arc::downgrade(&services),
        sender_shutdown.subscribe(),
    ));
    let (tls_shutdown, tls_stop) = tokio::sync::watch::channel(false);
    let (tls_addr, tls_task) = match &services.config.tls {
        Some(tls) => {
            let store = crate::api::tls::CertStore::open(tls)?;
            if tls.reload_interval_secs > 0 {
                tokio::spawn(store.clone().watch(
                    std::time::Duration::from_secs(tls.reload_interval_secs),
                    tls_stop.clone(),
                ));
            }
            tokio::spawn(reload_on_sighup(store.clone(), tls_stop.clone()));
            let acceptor = crate::api::tls::acceptor(store)?;
            let addr = SocketAddr::new(services.config.address, tls.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (TLS): {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            let task = tokio::spawn(crate::api::tls::serve(
                services.clone(),
                listener,
                acceptor,
                tls_stop,
            ));
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let task = tokio::spawn(crate::api::serve(services.clone(), listener, async {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        tls_addr,
        services,
        shutdown: Some(tx),
        task,
        tls_shutdown,
        tls_task,
        sender_shutdown,
        sender_task: Some(sender_task),
        appservice_task: Some(appservice_task),
    })
}

/// SIGHUP reloads the TLS certificate at once (what `systemctl reload` sends).
async fn reload_on_sighup(
    store: std::sync::Arc<crate::api::tls::CertStore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            got = hangups.recv() => {
                if got.is_none() {
                    return;
                }
                match store.reload(true) {
                    Ok(_) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::warn!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one stays in use"),
                }
            }
        }
    }
}
