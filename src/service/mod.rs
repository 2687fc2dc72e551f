//! Services: the domain logic. `Services` is built once from the config and passed to every
//! handler as axum state; there are no global singletons, so tests run many servers in one process.

pub mod account_data;
pub mod accounts;
pub mod appservice;
pub mod at_rest;
pub mod backup;
pub mod dehydrated;
pub mod e2ee;
pub mod federation;
pub mod filter;
pub mod globals;
pub mod inflight;
pub mod key_backup;
pub mod keys;
pub mod media;
pub mod presence;
pub mod profile;
pub mod push;
pub mod ratelimit;
pub mod receipts;
pub mod reports;
pub mod retention;
pub mod rooms;
pub mod server_keys;
pub mod sliding_sync;
pub mod sso;
pub mod sync;
pub mod to_device;
pub mod typing;
pub mod uiaa;
pub mod user_directory;

use std::sync::Arc;

use crate::{config::Config, error::Result, policy::Policy, storage::Storage};

pub struct Services {
    pub config: Config,
    pub storage: Storage,
    pub globals: Arc<globals::Globals>,
    pub accounts: accounts::Accounts,
    pub account_data: account_data::AccountData,
    pub rooms: rooms::Rooms,
    pub uiaa: uiaa::Uiaa,
    pub ratelimit: ratelimit::RateLimiter,
    pub policy: Policy,
    /// The audit log (policy layer): what happened, for the data-protection record.
    pub audit: Arc<crate::policy::audit::AuditLog>,
    /// The register of third-party services contacted (policy layer).
    pub register: Arc<crate::policy::register::Register>,
    /// Closed user groups, rooms bound to a group, the external policy hook (policy layer).
    pub access: crate::policy::access::Access,
    pub profiles: profile::Profiles,
    pub typing: typing::Typing,
    pub receipts: receipts::Receipts,
    pub presence: presence::Presence,
    pub keys: keys::Keys,
    pub to_device: to_device::ToDevice,
    pub key_backup: key_backup::KeyBackup,
    pub reports: reports::Reports,
    pub push: push::Push,
    pub server_keys: server_keys::ServerKeys,
    pub federation: federation::Federation,
    pub dehydrated: dehydrated::Dehydration,
    pub media: media::Media,
    /// Sliding sync connections (in memory) and its bump-stamp cache.
    pub sliding_sync: sliding_sync::SlidingSync,
    /// The retention purge job's state: admin purges and room deletions in progress.
    pub retention: retention::Retention,
    /// Backups: the key they are encrypted with and the state of the last run.
    pub backups: backup::Backups,
    /// Application services (bridges): registrations, their transaction queue, requests to them.
    pub appservices: Arc<appservice::Appservices>,
    /// SSO (OpenID Connect) and JWT login.
    pub sso: sso::Sso,
}

impl Services {
    pub fn build(config: Config, storage: Storage) -> Result<Arc<Services>> {
        // A missing, short or world-readable key file stops the start (the message names the
        // file, never the key).
        let keys = at_rest::AtRestKeys::load(&config).map_err(crate::error::Error::Internal)?;
        let counter = Arc::new(globals::StreamCounter::load(storage.clone())?);
        let signing_key = globals::SigningKey::load_or_create(&storage)?;
        let globals = Arc::new(globals::Globals {
            server_name: config.server_name.clone(),
            signing_key,
            counter,
        });
        let push = push::Push::new(storage.clone(), globals.clone(), Arc::default());
        let federation_wake = Arc::new(federation::sender::Wake::default());
        let audit = Arc::new(crate::policy::audit::AuditLog::new(
            storage.clone(),
            &config,
        ));
        let register = Arc::new(crate::policy::register::Register::new(
            storage.clone(),
            audit.clone(),
        ));
        let appservices = Arc::new(appservice::Appservices::load(&config, storage.clone())?);
        let groups = Arc::new(crate::policy::groups::Groups::new(
            storage.clone(),
            &config,
        )?);
        let services = Arc::new(Services {
            accounts: accounts::Accounts::new(
                storage.clone(),
                globals.clone(),
                &config.server_name,
                config.access_token_lifetime_secs,
            )
            .with_audit(audit.clone()),
            account_data: account_data::AccountData::new(storage.clone(), globals.clone()),
            rooms: rooms::Rooms::new(
                storage.clone(),
                globals.clone(),
                push.rules.clone(),
                push.pending.clone(),
                federation_wake.clone(),
            )
            .with_audit(audit.clone())
            .with_appservices(appservices.clone()),
            push,
            server_keys: server_keys::ServerKeys::new(storage.clone(), globals.clone()),
            federation: federation::Federation::new(
                &config,
                storage.clone(),
                globals.clone(),
                federation_wake,
            )?
            .with_register(register.clone()),
            dehydrated: dehydrated::Dehydration::default(),
            uiaa: uiaa::Uiaa::default(),
            ratelimit: ratelimit::RateLimiter::new(config.rate_limits.clone()),
            policy: Policy::new(&config),
            sso: sso::Sso::new(&config, register.clone())?,
            audit: audit.clone(),
            register,
            access: crate::policy::access::Access::new(groups.clone(), &config)?,
            profiles: profile::Profiles::new(storage.clone()),
            typing: typing::Typing::new(globals.clone()),
            receipts: receipts::Receipts::new(storage.clone(), globals.clone()),
            presence: presence::Presence::new(storage.clone(), globals.clone()),
            keys: keys::Keys::new(storage.clone()),
            to_device: to_device::ToDevice::new(storage.clone(), globals.clone())
                .with_policy(groups, audit.clone()),
            key_backup: key_backup::KeyBackup::new(storage.clone()),
            reports: reports::Reports::new(storage.clone()),
            media: media::Media::new(storage.clone(), &config, keys.media.as_ref())?,
            backups: backup::Backups::new(keys.backup.clone()),
            sliding_sync: sliding_sync::SlidingSync::default(),
            retention: retention::Retention::default(),
            appservices,
            globals,
            storage,
            config,
        });
        // The membership write path asks the policy layer about every membership event.
        services.rooms.set_policy(Arc::downgrade(&services));
        // Every appservice's sender exists from its registration on.
        for a in services.appservices.all().iter() {
            appservice::ensure_sender(&services, a)?;
        }
        Ok(services)
    }
}

/// Set up what a new account starts with (its display name is its localpart).
pub fn profile_defaults(services: &Services, user_id: &ruma::UserId) -> Result<()> {
    let name = serde_json::Value::String(user_id.localpart().to_owned());
    services.profiles.set(user_id, "displayname", Some(&name))
}
