//! Accounts: users, passwords (argon2), devices, access and refresh tokens (stored hashed),
//! registration tokens.

use std::time::Instant;

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use ruma::{OwnedDeviceId, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    error::{ErrCode, Error, Result},
    storage::{keys, Storage, Table},
    utils,
};

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct UserRecord {
    /// argon2 PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub guest: bool,
    pub created_ms: u64,
    /// Locked by a server admin: every request with the user's tokens is refused
    /// (`M_USER_LOCKED`) except logging out.
    #[serde(default)]
    pub locked: bool,
    /// Suspended by a server admin: the user may read, leave and log out, but not write
    /// (`M_USER_SUSPENDED`).
    #[serde(default)]
    pub suspended: bool,
    /// The version of the privacy notice the user accepted at registration, and when (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_notice_accepted: Option<(String, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    /// Expiry in ms since the epoch, for tokens issued with a refresh token.
    #[serde(default)]
    pub expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefreshRecord {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: OwnedDeviceId,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub last_seen_ip: Option<String>,
    #[serde(default)]
    pub last_seen_ts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_user_agent: Option<String>,
    /// Hex of the hashes of this device's current tokens, so deleting the device revokes them.
    #[serde(default)]
    pub access_token_hash: Option<String>,
    #[serde(default)]
    pub refresh_token_hash: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistrationToken {
    pub token: String,
    /// How many registrations it allows; `None` is unlimited.
    pub uses_allowed: Option<u32>,
    #[serde(default)]
    pub pending: u32,
    #[serde(default)]
    pub completed: u32,
    /// Expiry in ms since the epoch.
    pub expiry_time: Option<u64>,
}

/// A new login: what the client gets back.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<u64>,
}

/// Who a request comes from, after its token was checked.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub admin: bool,
    pub guest: bool,
    pub locked: bool,
    pub suspended: bool,
    /// The privacy notice version this user accepted (from the user record).
    pub accepted_notice: Option<String>,
    /// Set when the user must accept the current privacy notice before acting: where to do it
    /// (`policy::consent`).
    pub consent_uri: Option<String>,
    /// The appservice acting (its `as_token` was the access token), as this user.
    pub appservice: Option<std::sync::Arc<crate::service::appservice::Appservice>>,
}

impl Identity {
    /// Whether rate limits apply: always, except to appservices registered with
    /// `rate_limited: false`.
    pub fn rate_limited(&self) -> bool {
        self.appservice
            .as_ref()
            .is_none_or(|a| a.registration.is_rate_limited())
    }

    /// Refuse an action that needs an active account which accepted the current privacy
    /// notice: sending, joining, inviting, creating rooms, changing the profile, uploading.
    pub fn ensure_may_act(&self) -> Result<()> {
        self.ensure_not_suspended()?;
        if let Some(consent_uri) = &self.consent_uri {
            return Err(Error::ConsentNotGiven {
                consent_uri: consent_uri.clone(),
            });
        }
        Ok(())
    }

    /// Refuse an action a suspended account may not take (sending, joining, inviting,
    /// creating rooms, changing the profile, uploading).
    pub fn ensure_not_suspended(&self) -> Result<()> {
        if self.suspended {
            return Err(Error::new(
                crate::error::ErrCode::UserSuspended,
                "Your account is suspended",
            ));
        }
        Ok(())
    }
}

pub struct Accounts {
    storage: Storage,
    globals: std::sync::Arc<crate::service::globals::Globals>,
    server_name: ruma::OwnedServerName,
    access_token_lifetime_ms: u64,
    /// The audit log: logins, devices, token refreshes, connections.
    audit: Option<std::sync::Arc<crate::policy::audit::AuditLog>>,
    /// Read-modify-writes of device records (login, connection, touch, removal) of one user
    /// run one at a time, so a connection's last-seen write cannot bring back a removed
    /// device or an old token hash. Striped by user; held only around the read and the commit.
    device_locks: Vec<parking_lot::Mutex<()>>,
    /// Registration token uses held by registrations in progress; every read-modify-write of a
    /// token's counts happens under this lock, so a use cannot be handed out twice.
    token_uses: parking_lot::Mutex<TokenUses>,
}

/// Uses of registration tokens held by UIA sessions that passed the token stage and have not
/// registered yet (Synapse's `pending`): session id -> until when (the session's expiry). In
/// memory, like the sessions themselves, so a restart ends both together.
#[derive(Default)]
struct TokenUses {
    pending: std::collections::HashMap<String, std::collections::HashMap<String, Instant>>,
}

impl TokenUses {
    /// The live reservations of `token` (expired ones are dropped first).
    fn live(&mut self, token: &str) -> usize {
        let now = Instant::now();
        match self.pending.get_mut(token) {
            Some(held) => {
                held.retain(|_, until| *until > now);
                let n = held.len();
                if n == 0 {
                    self.pending.remove(token);
                }
                n
            }
            None => 0,
        }
    }

    /// Drop whatever `session` holds (of any token but `keep`).
    fn release_session(&mut self, session: &str, keep: &str) {
        for (token, held) in self.pending.iter_mut() {
            if token != keep {
                held.remove(session);
            }
        }
        self.pending.retain(|_, held| !held.is_empty());
    }
}

/// Most reservations recorded for a token without a use limit (they only feed `pending`).
const MAX_UNLIMITED_PENDING: usize = 10_000;

/// Stripes of [`Accounts::device_locks`].
const DEVICE_LOCK_STRIPES: usize = 64;

/// Run CPU-heavy work (argon2 takes tens of milliseconds and 19 MiB) without stalling the other
/// requests on this async worker: on the multi-threaded runtime the worker hands its other tasks
/// to the rest of the pool first. (On a single-threaded runtime, as in some tests, it runs inline.)
fn cpu_heavy<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok())
        .collect()
}

impl Accounts {
    pub fn new(
        storage: Storage,
        globals: std::sync::Arc<crate::service::globals::Globals>,
        server_name: &ServerName,
        access_token_lifetime_secs: u64,
    ) -> Accounts {
        Accounts {
            storage,
            globals,
            server_name: server_name.to_owned(),
            access_token_lifetime_ms: access_token_lifetime_secs * 1000,
            audit: None,
            device_locks: (0..DEVICE_LOCK_STRIPES)
                .map(|_| parking_lot::Mutex::new(()))
                .collect(),
            token_uses: parking_lot::Mutex::default(),
        }
    }

    /// The lock for `user_id`'s device records.
    fn device_lock(&self, user_id: &UserId) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user_id.as_str().hash(&mut h);
        let i = (h.finish() % DEVICE_LOCK_STRIPES as u64) as usize;
        self.device_locks[i % self.device_locks.len()].lock()
    }

    /// Write the audit entries of accounts and devices to `audit`.
    pub fn with_audit(mut self, audit: std::sync::Arc<crate::policy::audit::AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// An audit entry of `kind` about a device, with the current request's address and agent.
    pub(crate) fn audit_entry(
        &self,
        kind: &str,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
    ) -> Option<crate::policy::audit::AuditEntry> {
        let audit = self.audit.as_ref()?;
        Some(audit.entry(kind, Some(user_id.as_str()), Some(device_id.as_str())))
    }

    /// An address as devices keep it (`last_seen_ip`): under `audit_ip_mode`, like the audit
    /// log; without an audit log, not at all.
    fn kept_ip(&self, ip: Option<std::net::IpAddr>) -> Option<String> {
        self.audit.as_ref()?.ip(ip)
    }

    /// Record an entry of `kind` about a device after the fact.
    pub fn audit_note(&self, kind: &str, user_id: &UserId, device_id: &ruma::DeviceId) {
        if let (Some(audit), Some(e)) = (&self.audit, self.audit_entry(kind, user_id, device_id)) {
            audit.note(e);
        }
    }

    /// A request of `identity` came in: remember its connection in memory; when the address or
    /// user agent changed (or the interval passed), write a `connection` audit entry and the
    /// device's last-seen fields.
    pub fn note_connection(
        &self,
        identity: &Identity,
        ip: Option<std::net::IpAddr>,
        user_agent: Option<&str>,
    ) {
        let Some(audit) = &self.audit else { return };
        let Some(seen) = audit.connections.seen(
            identity.user_id.as_str(),
            identity.device_id.as_str(),
            ip,
            user_agent,
        ) else {
            return;
        };
        let write = || -> Result<()> {
            let _guard = self.device_lock(&identity.user_id);
            let mut b = self.storage.batch();
            if let Some(mut device) = self.stored_device(&identity.user_id, &identity.device_id)? {
                device.last_seen_ip = self.kept_ip(seen.ip);
                device.last_seen_ts = Some(seen.last_seen);
                device.last_seen_user_agent = seen.user_agent.clone();
                b.put(
                    Table::Devices,
                    &keys::join(&[identity.user_id.as_str(), identity.device_id.as_str()]),
                    &serde_json::to_vec(&device)?,
                )?;
            }
            let mut e = audit.entry(
                "connection",
                Some(identity.user_id.as_str()),
                Some(identity.device_id.as_str()),
            );
            e.ip = audit.ip(seen.ip);
            e.user_agent = seen.user_agent.clone();
            audit.put(&mut b, e)?;
            b.commit()
        };
        if let Err(e) = write() {
            tracing::error!(error = %e, "could not record a connection");
        }
    }

    /// The in-memory last connection laid over a stored device record; the address as
    /// `audit_ip_mode` keeps it (also one a record from before kept in full).
    fn with_last_seen(&self, user_id: &UserId, mut device: DeviceRecord) -> DeviceRecord {
        if let Some(seen) = self.audit.as_ref().and_then(|a| {
            a.connections
                .last(user_id.as_str(), device.device_id.as_str())
        }) {
            if device.last_seen_ts.is_none_or(|ts| ts <= seen.last_seen) {
                device.last_seen_ts = Some(seen.last_seen);
                device.last_seen_ip = seen.ip.map(|ip| ip.to_string());
                device.last_seen_user_agent = seen.user_agent;
            }
        }
        // A full address (in memory, or stored before the mode applied to devices) goes out
        // only as the mode keeps it; a value already kept that way is not an address.
        if let Some(ip) = device
            .last_seen_ip
            .as_deref()
            .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        {
            device.last_seen_ip = self.kept_ip(Some(ip));
        }
        device
    }

    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// Parse a localpart or full user id of this server, as `login` and `register` accept.
    pub fn local_user_id(&self, name: &str) -> Result<OwnedUserId> {
        let id = if name.starts_with('@') {
            UserId::parse(name)
                .map_err(|_| Error::new(ErrCode::InvalidUsername, "Invalid user id"))?
        } else {
            UserId::parse_with_server_name(name.to_lowercase(), &self.server_name)
                .map_err(|_| Error::new(ErrCode::InvalidUsername, "Invalid username"))?
        };
        if id.server_name() != self.server_name {
            return Err(Error::new(
                ErrCode::InvalidUsername,
                "User is not on this server",
            ));
        }
        Ok(id)
    }

    /// Localparts that a new user may take: the historical grammar is refused for new users.
    pub fn validate_new_localpart(&self, localpart: &str) -> Result<OwnedUserId> {
        if localpart.is_empty()
            || !localpart
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
        {
            return Err(Error::new(
                ErrCode::InvalidUsername,
                "Usernames may only contain a-z, 0-9, '.', '_', '=', '-', '/' and '+'",
            ));
        }
        let id = UserId::parse_with_server_name(localpart, &self.server_name)
            .map_err(|_| Error::new(ErrCode::InvalidUsername, "Invalid username"))?;
        if id.as_str().len() > 255 {
            return Err(Error::new(ErrCode::InvalidUsername, "User id is too long"));
        }
        Ok(id)
    }

    pub fn user(&self, user_id: &UserId) -> Result<Option<UserRecord>> {
        if user_id.server_name() != self.server_name {
            return Ok(None);
        }
        self.storage
            .get_json(Table::Users, user_id.localpart().as_bytes())
    }

    pub fn exists(&self, user_id: &UserId) -> Result<bool> {
        Ok(self.user(user_id)?.is_some())
    }

    fn put_user(
        &self,
        batch: &mut crate::storage::Batch,
        user_id: &UserId,
        rec: &UserRecord,
    ) -> Result<()> {
        batch.put(
            Table::Users,
            user_id.localpart().as_bytes(),
            &serde_json::to_vec(rec)?,
        )
    }

    pub fn hash_password(password: &str) -> Result<String> {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        cpu_heavy(|| {
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| Error::internal(format!("argon2: {e}")))
        })
    }

    /// Create an account. Fails with `M_USER_IN_USE` if the id is taken.
    pub fn create_user(
        &self,
        user_id: &UserId,
        password: Option<&str>,
        admin: bool,
        guest: bool,
    ) -> Result<()> {
        // The slow hash first; then the check and the write under the user's lock, so that two
        // creations of one id (two registrations, a registration and an SSO login) cannot both
        // pass the check and the later write replace the earlier account.
        let password_hash = password.map(Self::hash_password).transpose()?;
        let _creating = self.device_lock(user_id);
        if self.exists(user_id)? {
            return Err(Error::new(ErrCode::UserInUse, "User ID already taken"));
        }
        let rec = UserRecord {
            password_hash,
            admin,
            deactivated: false,
            guest,
            created_ms: utils::now_ms(),
            locked: false,
            suspended: false,
            privacy_notice_accepted: None,
        };
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    pub fn set_password(&self, user_id: &UserId, password: &str) -> Result<()> {
        let mut rec = self
            .user(user_id)?
            .ok_or_else(|| Error::not_found("Unknown user"))?;
        rec.password_hash = Some(Self::hash_password(password)?);
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    pub fn set_admin(&self, user_id: &UserId, admin: bool) -> Result<()> {
        let mut rec = self
            .user(user_id)?
            .ok_or_else(|| Error::not_found("Unknown user"))?;
        rec.admin = admin;
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    /// Lock or unlock (`lock`), or suspend or unsuspend, a local account.
    pub fn set_moderation(&self, user_id: &UserId, lock: bool, value: bool) -> Result<()> {
        let mut rec = self
            .user(user_id)?
            .filter(|r| !r.deactivated)
            .ok_or_else(|| Error::not_found("Unknown user"))?;
        if lock {
            rec.locked = value;
        } else {
            rec.suspended = value;
        }
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    /// Check a password in constant work whether or not the user exists.
    pub fn check_password(&self, user_id: &UserId, password: &str) -> Result<bool> {
        Ok(matches!(
            self.verify_password(user_id, password)?,
            PasswordCheck::Right { deactivated: false }
        ))
    }

    /// Whether `password` is the account's, in constant work whether or not the user exists.
    /// Only a right password learns that the account is deactivated.
    pub fn verify_password(&self, user_id: &UserId, password: &str) -> Result<PasswordCheck> {
        let rec = self.user(user_id)?;
        let hash = rec.as_ref().and_then(|r| r.password_hash.clone());
        let Some(hash) = hash else {
            // Spend the same effort as a real check so timing does not reveal which users exist.
            let _ = Self::hash_password(password);
            return Ok(PasswordCheck::Wrong);
        };
        let parsed =
            PasswordHash::new(&hash).map_err(|e| Error::internal(format!("stored hash: {e}")))?;
        let matches = cpu_heavy(|| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        Ok(if matches {
            PasswordCheck::Right {
                deactivated: rec.is_none_or(|r| r.deactivated),
            }
        } else {
            PasswordCheck::Wrong
        })
    }

    /// Log a device in: new or existing device id, fresh tokens.
    pub fn create_session(
        &self,
        user_id: &UserId,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<String>,
        with_refresh: bool,
    ) -> Result<Session> {
        let device_id = device_id.unwrap_or_else(|| utils::random_string(10).to_uppercase().into());
        let _guard = self.device_lock(user_id);
        let mut b = self.storage.batch();
        let existing = self.device(user_id, &device_id)?;
        if let Some(old) = &existing {
            self.revoke_device_tokens(&mut b, old)?;
        }
        let access_token = utils::random_string(32);
        let access_hash = utils::token_hash(&access_token);
        let expires_in_ms = with_refresh.then_some(self.access_token_lifetime_ms);
        let rec = TokenRecord {
            user_id: user_id.to_owned(),
            device_id: device_id.clone(),
            expires_ms: expires_in_ms.map(|ms| utils::now_ms() + ms),
        };
        b.put(
            Table::AccessTokens,
            &access_hash,
            &serde_json::to_vec(&rec)?,
        )?;
        let refresh_token = if with_refresh {
            let t = utils::random_string(40);
            let r = RefreshRecord {
                user_id: user_id.to_owned(),
                device_id: device_id.clone(),
            };
            b.put(
                Table::RefreshTokens,
                &utils::token_hash(&t),
                &serde_json::to_vec(&r)?,
            )?;
            Some(t)
        } else {
            None
        };
        if existing.is_none() {
            if let (Some(audit), Some(e)) = (
                &self.audit,
                self.audit_entry("device_created", user_id, &device_id),
            ) {
                audit.put(&mut b, e)?;
            }
        }
        let ctx = crate::policy::audit::RequestCtx::current();
        let device = DeviceRecord {
            device_id: device_id.clone(),
            display_name: display_name.or_else(|| existing.and_then(|d| d.display_name)),
            last_seen_ip: self.kept_ip(ctx.ip),
            last_seen_ts: Some(utils::now_ms()),
            last_seen_user_agent: ctx.user_agent,
            access_token_hash: Some(hex(&access_hash)),
            refresh_token_hash: refresh_token.as_deref().map(|t| hex(&utils::token_hash(t))),
        };
        b.put(
            Table::Devices,
            &keys::join(&[user_id.as_str(), device_id.as_str()]),
            &serde_json::to_vec(&device)?,
        )?;
        b.commit()?;
        Ok(Session {
            user_id: user_id.to_owned(),
            device_id,
            access_token,
            refresh_token,
            expires_in_ms,
        })
    }

    /// Exchange a refresh token for new tokens; the old pair stops working.
    pub fn refresh(&self, refresh_token: &str) -> Result<Session> {
        let hash = utils::token_hash(refresh_token);
        let rec: RefreshRecord = match self.storage.get(Table::RefreshTokens, &hash)? {
            Some(v) => serde_json::from_slice(&v)?,
            None => return Err(Error::UnknownToken { soft_logout: false }),
        };
        let device = self.device(&rec.user_id, &rec.device_id)?;
        let session = self.create_session(
            &rec.user_id,
            Some(rec.device_id),
            device.and_then(|d| d.display_name),
            true,
        )?;
        self.audit_note("token_refreshed", &session.user_id, &session.device_id);
        Ok(session)
    }

    /// Resolve an access token to its user and device.
    pub fn identify(&self, token: &str) -> Result<Identity> {
        let rec: TokenRecord = match self
            .storage
            .get(Table::AccessTokens, &utils::token_hash(token))?
        {
            Some(v) => serde_json::from_slice(&v)?,
            None => return Err(Error::UnknownToken { soft_logout: false }),
        };
        if let Some(exp) = rec.expires_ms {
            if utils::now_ms() >= exp {
                return Err(Error::UnknownToken { soft_logout: true });
            }
        }
        let user = self
            .user(&rec.user_id)?
            .ok_or(Error::UnknownToken { soft_logout: false })?;
        if user.deactivated {
            return Err(Error::UnknownToken { soft_logout: false });
        }
        Ok(Identity {
            user_id: rec.user_id,
            device_id: rec.device_id,
            admin: user.admin,
            guest: user.guest,
            locked: user.locked,
            suspended: user.suspended,
            appservice: None,
            accepted_notice: user.privacy_notice_accepted.map(|(version, _)| version),
            consent_uri: None,
        })
    }

    fn revoke_device_tokens(
        &self,
        b: &mut crate::storage::Batch,
        device: &DeviceRecord,
    ) -> Result<()> {
        if let Some(h) = &device.access_token_hash {
            b.delete(Table::AccessTokens, &unhex(h))?;
        }
        if let Some(h) = &device.refresh_token_hash {
            b.delete(Table::RefreshTokens, &unhex(h))?;
        }
        Ok(())
    }

    pub fn device(
        &self,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
    ) -> Result<Option<DeviceRecord>> {
        Ok(self
            .stored_device(user_id, device_id)?
            .map(|d| self.with_last_seen(user_id, d)))
    }

    /// The device as stored (without the in-memory last connection).
    fn stored_device(
        &self,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
    ) -> Result<Option<DeviceRecord>> {
        self.storage.get_json(
            Table::Devices,
            &keys::join(&[user_id.as_str(), device_id.as_str()]),
        )
    }

    pub fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceRecord>> {
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::Devices, &keys::prefix(&[user_id.as_str()]))?
        {
            let (_, v) = entry?;
            out.push(self.with_last_seen(user_id, serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    pub fn update_device(&self, user_id: &UserId, device: &DeviceRecord) -> Result<()> {
        self.storage.put(
            Table::Devices,
            &keys::join(&[user_id.as_str(), device.device_id.as_str()]),
            &serde_json::to_vec(device)?,
        )
    }

    /// Remove a device (logout, device deletion) in one batch: its tokens, its E2EE keys and
    /// undelivered to-device messages; the change goes to the device-list log so that the user's
    /// other devices and room mates stop encrypting for it. Only the owner is woken at once;
    /// room mates see the change in their next sync. Returns the device-list log count of the
    /// change (None: there was no such device).
    pub fn remove_device(
        &self,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
    ) -> Result<Option<u64>> {
        let guard = self.device_lock(user_id);
        let Some(device) = self.stored_device(user_id, device_id)? else {
            return Ok(None);
        };
        let pending = self.globals.counter.next()?;
        let mut b = self.storage.batch();
        if let (Some(audit), Some(e)) = (
            &self.audit,
            self.audit_entry("device_deleted", user_id, device_id),
        ) {
            audit.put(&mut b, e)?;
            audit
                .connections
                .forget(user_id.as_str(), device_id.as_str());
        }
        self.revoke_device_tokens(&mut b, &device)?;
        b.delete(
            Table::Devices,
            &keys::join(&[user_id.as_str(), device_id.as_str()]),
        )?;
        crate::service::keys::remove_device_rows(&self.storage, &mut b, user_id, device_id)?;
        crate::service::push::pushers::remove_device_rows(
            &self.storage,
            &mut b,
            user_id,
            device_id.as_str(),
        )?;
        crate::service::dehydrated::remove_device_rows(
            &self.storage,
            &mut b,
            user_id,
            device_id.as_str(),
        )?;
        crate::service::keys::log_change(
            &mut b,
            pending.get(),
            &crate::service::keys::ListChange::Keys {
                user: user_id.to_owned(),
            },
        )?;
        b.commit()?;
        drop(guard);
        let count = pending.get();
        pending.finish(vec![user_id.to_owned()]);
        Ok(Some(count))
    }

    /// A device nobody logs in with (a dehydrated device): no tokens.
    pub fn create_device_without_tokens(
        &self,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
        display_name: Option<String>,
    ) -> Result<()> {
        let device = DeviceRecord {
            device_id: device_id.to_owned(),
            display_name,
            last_seen_ip: None,
            last_seen_ts: Some(utils::now_ms()),
            last_seen_user_agent: None,
            access_token_hash: None,
            refresh_token_hash: None,
        };
        self.storage.put(
            Table::Devices,
            &keys::join(&[user_id.as_str(), device_id.as_str()]),
            &serde_json::to_vec(&device)?,
        )
    }

    pub fn remove_all_devices(
        &self,
        user_id: &UserId,
        except: Option<&ruma::DeviceId>,
    ) -> Result<()> {
        for d in self.devices(user_id)? {
            if Some(&*d.device_id) != except {
                self.remove_device(user_id, &d.device_id)?;
            }
        }
        Ok(())
    }

    /// Record which privacy notice version the user accepted.
    pub fn set_privacy_notice_accepted(&self, user_id: &UserId, version: &str) -> Result<()> {
        let mut rec = self
            .user(user_id)?
            .ok_or_else(|| Error::not_found("Unknown user"))?;
        rec.privacy_notice_accepted = Some((version.to_owned(), utils::now_ms()));
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    /// Deactivate: no more logins, every device logged out, password removed.
    pub fn deactivate(&self, user_id: &UserId) -> Result<()> {
        self.remove_all_devices(user_id, None)?;
        let mut rec = self
            .user(user_id)?
            .ok_or_else(|| Error::not_found("Unknown user"))?;
        rec.deactivated = true;
        rec.password_hash = None;
        let mut b = self.storage.batch();
        self.put_user(&mut b, user_id, &rec)?;
        b.commit()
    }

    /// Every local user id (admin tools).
    pub fn count_users(&self) -> Result<usize> {
        Ok(self.storage.scan_prefix(Table::Users, b"")?.count())
    }

    // Registration tokens.

    pub fn create_registration_token(
        &self,
        token: Option<String>,
        uses_allowed: Option<u32>,
        expiry_time: Option<u64>,
    ) -> Result<RegistrationToken> {
        let token = token.unwrap_or_else(|| utils::random_string(16));
        if token.is_empty()
            || token.len() > 64
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            return Err(Error::invalid_param(
                "Token must be 1-64 characters of [A-Za-z0-9._~-]",
            ));
        }
        let rec = RegistrationToken {
            token: token.clone(),
            uses_allowed,
            pending: 0,
            completed: 0,
            expiry_time,
        };
        self.storage.put(
            Table::RegistrationTokens,
            token.as_bytes(),
            &serde_json::to_vec(&rec)?,
        )?;
        Ok(rec)
    }

    /// Every registration token, with its live `pending` count.
    pub fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        let mut uses = self.token_uses.lock();
        let mut out = Vec::new();
        for entry in self.storage.scan_prefix(Table::RegistrationTokens, b"")? {
            let (_, v) = entry?;
            let mut rec: RegistrationToken = serde_json::from_slice(&v)?;
            rec.pending = uses.live(&rec.token) as u32;
            out.push(rec);
        }
        Ok(out)
    }

    /// One registration token, with its live `pending` count.
    pub fn registration_token(&self, token: &str) -> Result<Option<RegistrationToken>> {
        let mut uses = self.token_uses.lock();
        self.token_record(&mut uses, token)
    }

    /// The stored token with `pending` from `uses` (the caller holds the lock).
    fn token_record(&self, uses: &mut TokenUses, token: &str) -> Result<Option<RegistrationToken>> {
        let rec: Option<RegistrationToken> = self
            .storage
            .get_json(Table::RegistrationTokens, token.as_bytes())?;
        Ok(rec.map(|mut r| {
            r.pending = uses.live(token) as u32;
            r
        }))
    }

    /// Store a token's record (the caller holds the lock; `pending` is kept in memory only).
    fn store_token(&self, rec: &RegistrationToken) -> Result<()> {
        let stored = RegistrationToken {
            pending: 0,
            ..rec.clone()
        };
        self.storage.put(
            Table::RegistrationTokens,
            rec.token.as_bytes(),
            &serde_json::to_vec(&stored)?,
        )
    }

    /// Change a token's limits (`Some(None)` removes one): the admin API. None when there is no
    /// such token. Under the token lock, so a use counted meanwhile is not overwritten.
    pub fn update_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<Option<u32>>,
        expiry_time: Option<Option<u64>>,
    ) -> Result<Option<RegistrationToken>> {
        let mut uses = self.token_uses.lock();
        let Some(mut rec) = self.token_record(&mut uses, token)? else {
            return Ok(None);
        };
        if let Some(n) = uses_allowed {
            rec.uses_allowed = n;
        }
        if let Some(t) = expiry_time {
            rec.expiry_time = t;
        }
        self.store_token(&rec)?;
        Ok(Some(rec))
    }

    /// Delete a registration token (and the uses registrations in progress hold); false when
    /// there was none.
    pub fn delete_registration_token(&self, token: &str) -> Result<bool> {
        let mut uses = self.token_uses.lock();
        if self.token_record(&mut uses, token)?.is_none() {
            return Ok(false);
        }
        let mut b = self.storage.batch();
        b.delete(Table::RegistrationTokens, token.as_bytes())?;
        b.commit()?;
        uses.pending.remove(token);
        Ok(true)
    }

    /// Whether `token` can still be used (the configured token always can): not expired, and
    /// fewer uses completed or held by registrations in progress than allowed.
    pub fn registration_token_valid(&self, token: &str, configured: Option<&str>) -> Result<bool> {
        if configured == Some(token) {
            return Ok(true);
        }
        let mut uses = self.token_uses.lock();
        Ok(self
            .token_record(&mut uses, token)?
            .is_some_and(|rec| has_use_left(&rec)))
    }

    /// The token stage of UIA session `session` accepted `token`: hold one use of it for the
    /// session until `until` (its expiry), atomically with the check that one is left. A session
    /// holds at most one use (naming the token again holds nothing more; naming another token
    /// gives the first one's use back). False: the token is unknown, expired or used up.
    pub fn reserve_registration_token(
        &self,
        token: &str,
        session: &str,
        until: Instant,
        configured: Option<&str>,
    ) -> Result<bool> {
        let mut uses = self.token_uses.lock();
        uses.release_session(session, token);
        if configured == Some(token) {
            return Ok(true);
        }
        let already = uses
            .pending
            .get(token)
            .and_then(|held| held.get(session))
            .is_some_and(|t| *t > Instant::now());
        let Some(rec) = self.token_record(&mut uses, token)? else {
            return Ok(false);
        };
        if already {
            return Ok(rec.expiry_time.is_none_or(|t| t > utils::now_ms()));
        }
        if !has_use_left(&rec) {
            return Ok(false);
        }
        let held = uses.pending.entry(token.to_owned()).or_default();
        if rec.uses_allowed.is_some() || held.len() < MAX_UNLIMITED_PENDING {
            held.insert(session.to_owned(), until);
        }
        Ok(true)
    }

    /// Registration through session `session` is going ahead: its held use of `token` becomes a
    /// completed one (durably, before the account is made; [`Accounts::refund_registration_token`]
    /// gives it back if that fails). Without a held use (it expired), a use is taken only if one
    /// is left; otherwise `M_UNAUTHORIZED`.
    pub fn complete_registration_token(
        &self,
        token: &str,
        session: &str,
        configured: Option<&str>,
    ) -> Result<()> {
        if configured == Some(token) {
            return Ok(());
        }
        let mut uses = self.token_uses.lock();
        let held = uses
            .pending
            .get_mut(token)
            .and_then(|held| held.remove(session))
            .is_some_and(|until| until > Instant::now());
        let rec = self.token_record(&mut uses, token)?;
        let Some(mut rec) = rec.filter(|r| held || has_use_left(r)) else {
            return Err(Error::new(
                ErrCode::Unauthorized,
                "The registration token is used up",
            ));
        };
        rec.completed = rec.completed.saturating_add(1);
        self.store_token(&rec)
    }

    /// Give back a use counted by [`Accounts::complete_registration_token`] for a registration
    /// that then failed (the name was taken meanwhile).
    pub fn refund_registration_token(&self, token: &str, configured: Option<&str>) -> Result<()> {
        if configured == Some(token) {
            return Ok(());
        }
        let mut uses = self.token_uses.lock();
        if let Some(mut rec) = self.token_record(&mut uses, token)? {
            rec.completed = rec.completed.saturating_sub(1);
            self.store_token(&rec)?;
        }
        Ok(())
    }
}

/// Not expired, and fewer uses completed or held than allowed.
fn has_use_left(rec: &RegistrationToken) -> bool {
    rec.expiry_time.is_none_or(|t| t > utils::now_ms())
        && rec
            .uses_allowed
            .is_none_or(|n| rec.completed.saturating_add(rec.pending) < n)
}

impl Accounts {
    /// Remember where and when a device was last used (set at login).
    pub fn touch_device(
        &self,
        user_id: &UserId,
        device_id: &ruma::DeviceId,
        ip: Option<std::net::IpAddr>,
    ) -> Result<()> {
        let _guard = self.device_lock(user_id);
        let Some(mut device) = self.device(user_id, device_id)? else {
            return Ok(());
        };
        device.last_seen_ip = self.kept_ip(ip);
        device.last_seen_ts = Some(utils::now_ms());
        self.update_device(user_id, &device)
    }

    /// A fresh localpart for users who did not choose one (and guests).
    pub fn generate_localpart(&self) -> Result<OwnedUserId> {
        // Bounded: a collision among 36^12 names is practically impossible, but never loop forever.
        for _ in 0..16 {
            let id = self.validate_new_localpart(&utils::random_string(12).to_lowercase())?;
            if !self.exists(&id)? {
                return Ok(id);
            }
        }
        Err(Error::internal("could not generate a free user id"))
    }
}

/// Longest password accepted: hashing cost grows with length.
pub const MAX_PASSWORD_LEN: usize = 512;

/// What a password check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordCheck {
    /// Not the password (or no such account, or one without a password).
    Wrong,
    Right {
        deactivated: bool,
    },
}

/// Check `user`'s password for a client at `ip` (login, re-authentication) under the failure
/// limit of that account from that address (`rate_limits.login_failures`): a token is taken
/// before the check, so concurrent guesses cannot pass the limit, and given back when the
/// password was right, so only failures count. Keyed by account and address, a guesser
/// elsewhere never locks the owner out; the bucket refills by itself. The caller has checked
/// the per-address limit (`rate_limits.login`).
pub fn verify_password_limited(
    services: &crate::service::Services,
    user: &UserId,
    password: &str,
    ip: Option<std::net::IpAddr>,
) -> Result<PasswordCheck> {
    use crate::service::ratelimit::{password_failure_key, Action};
    let key = password_failure_key(user.as_str(), ip);
    services.ratelimit.check(Action::LoginFailure, &key)?;
    let found = if password.len() > MAX_PASSWORD_LEN {
        PasswordCheck::Wrong
    } else {
        services.accounts.verify_password(user, password)?
    };
    if found != PasswordCheck::Wrong {
        services.ratelimit.refund(Action::LoginFailure, &key);
    }
    Ok(found)
}

/// What a client asked `POST /register` for.
#[derive(Debug, Default)]
pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<OwnedDeviceId>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub refresh_token: bool,
    pub guest: bool,
    pub auth: Option<serde_json::Value>,
    /// The client's address, for the rate limit.
    pub ip: Option<std::net::IpAddr>,
}

/// The UIA flows registration offers now; empty means registration is closed.
pub fn registration_flows(services: &crate::service::Services) -> Result<Vec<Vec<&'static str>>> {
    let mut flows = Vec::new();
    if services.config.allow_registration {
        flows.push(vec!["m.login.dummy"]);
    }
    if registration_tokens_enabled(services)? {
        flows.push(vec!["m.login.registration_token"]);
    }
    // With a privacy notice configured, every flow ends with accepting it (A1).
    if services.config.privacy_notice.is_some() {
        for f in &mut flows {
            f.push("m.login.terms");
        }
    }
    Ok(flows)
}

/// The `params` of the `m.login.terms` stage (the spec's terms auth type): the privacy notice as
/// the one policy, or nothing when none is configured.
pub fn terms_params(services: &crate::service::Services) -> serde_json::Value {
    match &services.config.privacy_notice {
        Some(p) => serde_json::json!({
            "m.login.terms": {
                "policies": {
                    "privacy_notice": {
                        "version": p.version,
                        "en": {
                            "name": p.name.as_deref().unwrap_or("Privacy notice"),
                            "url": p.url,
                        }
                    }
                }
            }
        }),
        None => serde_json::json!({}),
    }
}

/// Registration tokens work when one is configured or one was created with `hafen token create`.
pub fn registration_tokens_enabled(services: &crate::service::Services) -> Result<bool> {
    Ok(services.config.registration_token.is_some()
        || !services.accounts.registration_tokens()?.is_empty())
}

/// Register an account: guest access, username checks, user-interactive authentication, then
/// the account, its default profile and (unless inhibited) a first session.
pub fn register(
    services: &crate::service::Services,
    r: Registration,
) -> Result<(OwnedUserId, Option<Session>)> {
    let accounts = &services.accounts;
    if let Some(ip) = r.ip {
        services
            .ratelimit
            .check_ip(crate::service::ratelimit::Action::Registration, ip)?;
    }
    if let Some(p) = &r.password {
        if p.len() > MAX_PASSWORD_LEN {
            return Err(Error::invalid_param("Password is too long"));
        }
    }
    if r.guest {
        if !services.config.allow_guest_registration {
            return Err(Error::new(
                ErrCode::GuestAccessForbidden,
                "Guest registration is disabled",
            ));
        }
        // Guests get a generated id, no password and always a session.
        let user_id = accounts.generate_localpart()?;
        accounts.create_user(&user_id, None, false, true)?;
        crate::service::profile_defaults(services, &user_id)?;
        let session = accounts.create_session(
            &user_id,
            None,
            r.initial_device_display_name,
            r.refresh_token,
        )?;
        return Ok((user_id, Some(session)));
    }

    let flows = registration_flows(services)?;
    if flows.is_empty() {
        return Err(Error::forbidden("Registration is disabled"));
    }
    // Check the name before authentication, so a client learns early that it is taken.
    let user_id = match &r.username {
        Some(name) => {
            let id = accounts.validate_new_localpart(&name.to_lowercase())?;
            // Names an appservice reserved are for it alone (400 `M_EXCLUSIVE`).
            services.appservices.ensure_user_not_exclusive(&id, None)?;
            if accounts.exists(&id)? {
                return Err(Error::new(ErrCode::UserInUse, "User ID already taken"));
            }
            id
        }
        None => accounts.generate_localpart()?,
    };

    let configured = services.config.registration_token.as_deref();
    let allow_dummy = services.config.allow_registration;
    let mut check = |session: &str,
                     stage: &str,
                     auth: &serde_json::Map<String, serde_json::Value>|
     -> Result<Option<(String, String)>> {
        match stage {
            "m.login.dummy" if allow_dummy => Ok(None),
            "m.login.registration_token" => {
                let token = auth
                    .get("token")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| Error::bad_json("Missing registration token"))?;
                // Accepting the stage holds one use of the token for this session until it
                // registers or expires, so concurrent sessions cannot share the last use.
                let until = services.uiaa.deadline(session).unwrap_or_else(Instant::now);
                if token.len() <= 64
                    && accounts.reserve_registration_token(token, session, until, configured)?
                {
                    Ok(Some(("registration_token".to_owned(), token.to_owned())))
                } else {
                    Err(Error::new(
                        ErrCode::Unauthorized,
                        "Invalid registration token",
                    ))
                }
            }
            "m.login.terms" if services.config.privacy_notice.is_some() => Ok(Some((
                "privacy_notice_version".to_owned(),
                services
                    .config
                    .privacy_notice
                    .as_ref()
                    .map(|p| p.version.clone())
                    .unwrap_or_default(),
            ))),
            _ => Err(Error::forbidden("Stage not allowed")),
        }
    };
    let session = services.uiaa.run(
        &flows,
        terms_params(services),
        r.auth.as_ref(),
        None,
        &mut check,
    )?;

    // The held use becomes a completed one before the account exists: a crash in between
    // loses a use rather than making one account too many.
    let token = session.data.get("registration_token");
    if let Some(token) = token {
        accounts.complete_registration_token(token, &session.id, configured)?;
    }
    if let Err(e) = accounts.create_user(&user_id, r.password.as_deref(), false, false) {
        if let Some(token) = token {
            accounts.refund_registration_token(token, configured)?;
        }
        return Err(e);
    }
    if let Some(version) = session.data.get("privacy_notice_version") {
        accounts.set_privacy_notice_accepted(&user_id, version)?;
        services.audit.record(crate::policy::audit::AuditEntry {
            kind: "privacy_notice_accepted".to_owned(),
            user: Some(user_id.to_string()),
            detail: serde_json::json!({ "version": version }),
            ..Default::default()
        })?;
    }
    finish_registration(services, user_id, r)
}

/// The last steps of every registration: the profile defaults, then a session unless the client
/// asked for none (`inhibit_login`).
fn finish_registration(
    services: &crate::service::Services,
    user_id: OwnedUserId,
    r: Registration,
) -> Result<(OwnedUserId, Option<Session>)> {
    crate::service::profile_defaults(services, &user_id)?;
    if r.inhibit_login {
        return Ok((user_id, None));
    }
    let session = services.accounts.create_session(
        &user_id,
        r.device_id,
        r.initial_device_display_name,
        r.refresh_token,
    )?;
    Ok((user_id, Some(session)))
}

/// Register a user for an appservice (`type: m.login.application_service`): the name must lie
/// in its user namespace (400 `M_EXCLUSIVE` otherwise, as Synapse answers); no UIA, no rate
/// limit, open even when registration is closed.
pub fn register_for_appservice(
    services: &crate::service::Services,
    appservice: &crate::service::appservice::Appservice,
    r: Registration,
) -> Result<(OwnedUserId, Option<Session>)> {
    let accounts = &services.accounts;
    let name = r
        .username
        .as_deref()
        .ok_or_else(|| Error::new(ErrCode::MissingParam, "Missing 'username'"))?;
    let user_id = accounts.validate_new_localpart(name)?;
    if !appservice.owns_user(&user_id) {
        return Err(Error::new(
            ErrCode::Exclusive,
            "This user id is not in the application service's namespace",
        ));
    }
    services
        .appservices
        .ensure_user_not_exclusive(&user_id, Some(appservice.id()))?;
    accounts.create_user(&user_id, None, false, false)?;
    finish_registration(services, user_id, r)
}

/// Log in as an appservice's user (`m.login.application_service`, the appservice's `as_token`
/// as access token): the user must be the appservice's (403 `M_FORBIDDEN`) and exist.
pub fn appservice_login(
    services: &crate::service::Services,
    appservice: &crate::service::appservice::Appservice,
    name: &str,
    device_id: Option<OwnedDeviceId>,
    display_name: Option<String>,
    with_refresh: bool,
    ip: Option<std::net::IpAddr>,
) -> Result<Session> {
    let accounts = &services.accounts;
    let user_id = accounts
        .local_user_id(name)
        .map_err(|_| Error::forbidden("Invalid user for this application service"))?;
    if !appservice.owns_user(&user_id) {
        return Err(Error::forbidden(
            "Invalid user for this application service",
        ));
    }
    match accounts.user(&user_id)? {
        Some(u) if u.deactivated => {
            return Err(Error::new(
                ErrCode::UserDeactivated,
                "This account has been deactivated",
            ))
        }
        Some(_) => {}
        None => {
            return Err(Error::forbidden(
                "Invalid user for this application service",
            ))
        }
    }
    crate::policy::access::check_device_limit(services, &user_id, device_id.as_deref())?;
    let session = accounts.create_session(&user_id, device_id, display_name, with_refresh)?;
    accounts.touch_device(&user_id, &session.device_id, ip)?;
    accounts.audit_note("login", &user_id, &session.device_id);
    Ok(session)
}

/// Log in with a password. Failures say only "forbidden", so they do not reveal which users exist.
pub fn password_login(
    services: &crate::service::Services,
    name: &str,
    password: &str,
    device_id: Option<OwnedDeviceId>,
    display_name: Option<String>,
    with_refresh: bool,
    ip: Option<std::net::IpAddr>,
) -> Result<Session> {
    use crate::service::ratelimit::Action;
    let accounts = &services.accounts;
    if let Some(ip) = ip {
        services.ratelimit.check_ip(Action::Login, ip)?;
    }
    let failed = |attempted: &str, reason: &str| {
        // The attempted id, never the password.
        let mut e = services.audit.entry("login_failed", Some(attempted), None);
        e.detail = serde_json::json!({ "reason": reason });
        services.audit.note(e);
    };
    let Ok(user_id) = accounts.local_user_id(name) else {
        let attempted: String = name.chars().take(255).collect();
        failed(&attempted, "invalid_user_id");
        return Err(Error::forbidden("Invalid username or password"));
    };
    match verify_password_limited(services, &user_id, password, ip)? {
        PasswordCheck::Right { deactivated: false } => {}
        // Only who knows the password learns that the account is deactivated.
        PasswordCheck::Right { deactivated: true } => {
            failed(user_id.as_str(), "deactivated");
            return Err(Error::new(
                ErrCode::UserDeactivated,
                "This account has been deactivated",
            ));
        }
        PasswordCheck::Wrong => {
            // The reason is for the audit log only; the client hears the same in every case.
            let reason = match accounts.user(&user_id)? {
                None => "unknown_user",
                Some(u) if u.deactivated => "deactivated",
                Some(_) => "wrong_password",
            };
            failed(user_id.as_str(), reason);
            return Err(Error::forbidden("Invalid username or password"));
        }
    }
    crate::policy::access::check_device_limit(services, &user_id, device_id.as_deref())?;
    let session = accounts.create_session(&user_id, device_id, display_name, with_refresh)?;
    accounts.touch_device(&user_id, &session.device_id, ip)?;
    if let Some(mut e) = accounts.audit_entry("login", &user_id, &session.device_id) {
        e.detail = serde_json::json!({ "method": "password" });
        services.audit.note(e);
    }
    Ok(session)
}

/// Deactivate an account: leave every room (so others see it go), then lock it.
pub async fn deactivate_account(
    services: &crate::service::Services,
    user_id: &UserId,
) -> Result<()> {
    use crate::service::rooms::NewEvent;
    for (room_id, room) in services.rooms.user_rooms(user_id)? {
        if !matches!(room.membership.as_str(), "join" | "invite" | "knock") {
            continue;
        }
        let leave = NewEvent::state(
            "m.room.member",
            user_id.as_str(),
            serde_json::json!({ "membership": "leave" }),
        );
        if let Err(e) = services.rooms.append(&room_id, user_id, leave, None).await {
            // One room refusing (e.g. a broken state) must not keep the account alive.
            tracing::warn!(%room_id, error = %e, "could not leave room while deactivating");
        }
    }
    services.accounts.deactivate(user_id)
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::service::globals::{Globals, SigningKey, StreamCounter};

    fn accounts() -> (tempfile::TempDir, Accounts) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), 8, false).unwrap();
        let server_name: ruma::OwnedServerName = "localhost".try_into().unwrap();
        let globals = Arc::new(Globals {
            server_name: server_name.clone(),
            signing_key: SigningKey::load_or_create(&storage).unwrap(),
            counter: Arc::new(StreamCounter::load(storage.clone()).unwrap()),
        });
        let accounts = Accounts::new(storage, globals, &server_name, 3600);
        (dir, accounts)
    }

    #[test]
    fn a_token_use_held_by_an_expired_session_is_released() {
        let (_dir, a) = accounts();
        a.create_registration_token(Some("t".into()), Some(1), None)
            .unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        // A session whose expiry has come holds nothing any more.
        assert!(a
            .reserve_registration_token("t", "expired", Instant::now(), None)
            .unwrap());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(a.registration_token("t").unwrap().unwrap().pending, 0);
        assert!(a
            .reserve_registration_token("t", "live", later, None)
            .unwrap());
        assert_eq!(a.registration_token("t").unwrap().unwrap().pending, 1);
        // The live session holds the only use: no other session gets it.
        assert!(!a
            .reserve_registration_token("t", "other", later, None)
            .unwrap());
        // The expired session cannot complete on a use it no longer holds.
        assert!(a.complete_registration_token("t", "expired", None).is_err());
        a.complete_registration_token("t", "live", None).unwrap();
        let rec = a.registration_token("t").unwrap().unwrap();
        assert_eq!((rec.pending, rec.completed), (0, 1));
        // Completing twice (two requests finishing one session) counts once.
        assert!(a.complete_registration_token("t", "live", None).is_err());
        // A failed account creation gives the use back.
        a.refund_registration_token("t", None).unwrap();
        assert!(a.registration_token_valid("t", None).unwrap());
    }

    #[test]
    fn only_the_right_password_reveals_deactivation() {
        let (_dir, a) = accounts();
        let id = a.validate_new_localpart("gone").unwrap();
        a.create_user(&id, Some("secret"), false, false).unwrap();
        // Deactivated but (unlike `deactivate`) still with its hash: the worst case.
        let mut rec = a.user(&id).unwrap().unwrap();
        rec.deactivated = true;
        let mut b = a.storage.batch();
        a.put_user(&mut b, &id, &rec).unwrap();
        b.commit().unwrap();
        assert_eq!(
            a.verify_password(&id, "wrong").unwrap(),
            PasswordCheck::Wrong
        );
        assert_eq!(
            a.verify_password(&id, "secret").unwrap(),
            PasswordCheck::Right { deactivated: true }
        );
        assert!(!a.check_password(&id, "secret").unwrap());
    }
}
