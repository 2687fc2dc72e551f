//! Configuration: `conduit-config.toml` (keys under `[global]`, named as Conduit names them),
//! overridden by `HAFEN_<KEY>` environment variables. Unknown keys are warned about by name;
//! invalid values stop the start with a message that says which key is wrong.

use std::{net::IpAddr, path::PathBuf};

use ruma::{OwnedServerName, RoomVersionId};
use serde::{Deserialize, Serialize};

/// The whole configuration. Every field is documented in docs/configuration.md; a test checks that
/// the documentation and the example config name every key of this struct.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The name of this homeserver: the part after the colon of user ids.
    #[serde(default = "default_server_name")]
    pub server_name: OwnedServerName,
    /// The address the client API listens on.
    #[serde(default = "default_address")]
    pub address: IpAddr,
    /// The port the client API listens on; 0 picks a free one (tests).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Where the RocksDB database lives.
    #[serde(default = "default_database_path")]
    pub database_path: PathBuf,
    /// Storage backend; only the embedded `rocksdb` exists today.
    #[serde(default = "default_database_backend")]
    pub database_backend: String,
    /// fsync every write before acknowledging it (survives power loss, not only a crash).
    #[serde(default = "default_true")]
    pub database_sync_writes: bool,
    /// RocksDB block cache size in MiB.
    #[serde(default = "default_db_cache_capacity_mb")]
    pub db_cache_capacity_mb: u64,
    /// Compression of the database's table files: `lz4` (default) or `none` (larger files;
    /// what was written stays byte-for-byte searchable, e.g. to verify physical deletion).
    #[serde(default = "default_rocksdb_compression")]
    pub rocksdb_compression_algo: String,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_request_size")]
    pub max_request_size: usize,
    /// Open registration without a token. Off by default (privacy-protective default).
    #[serde(default)]
    pub allow_registration: bool,
    /// A registration token that is always valid (in addition to tokens made with `hafen token create`).
    #[serde(default)]
    pub registration_token: Option<String>,
    /// Guests (`kind=guest`) may register.
    #[serde(default)]
    pub allow_guest_registration: bool,
    /// Federation with other homeservers. Off by default: a closed deployment talks to nobody.
    #[serde(default)]
    pub allow_federation: bool,
    /// When not empty, the only servers federated with (host names, `*` matches any part, e.g.
    /// `"*.partner.example"`): partner-only federation. An entry without a port matches the
    /// host on every port, one with a port (`"partner.example:8448"`) only that port; IP
    /// literals as in server names (`"192.0.2.7"`, `"[2001:db8::1]"`).
    #[serde(default)]
    pub federation_allowlist: Vec<String>,
    /// Servers never federated with, whatever the allowlist says (same patterns: `"evil.example"`
    /// denies `evil.example` on every port).
    #[serde(default)]
    pub federation_denylist: Vec<String>,
    /// Servers trusted for key lookups during federation.
    #[serde(default)]
    pub trusted_servers: Vec<OwnedServerName>,
    /// Room version for new rooms.
    #[serde(default = "default_room_version")]
    pub default_room_version: RoomVersionId,
    /// Closed user groups (`[[global.groups]]`): each a `name`, `users` (user ids, `*` globs such
    /// as `"@*:hafen.example"`) and `servers` (server names of partner organizations, `*` globs).
    /// Empty (and no groups made through the admin API): everybody may contact everybody.
    #[serde(default)]
    pub groups: Vec<crate::policy::groups::GroupConfig>,
    /// Which groups may contact each other besides their own members: pairs of group names,
    /// e.g. `[["staff", "partners"]]` (both directions).
    #[serde(default)]
    pub group_contact: Vec<[String; 2]>,
    /// An external policy service asked before invite, join, createRoom and sending messages.
    #[serde(default)]
    pub policy_hook: Option<crate::policy::hook::PolicyHookConfig>,
    /// How the audit log keeps IP addresses: `truncate` (default: /24 and /48), `hash` (keyed),
    /// `keep` or `drop`.
    #[serde(default)]
    pub audit_ip_mode: crate::policy::audit::IpMode,
    /// Days audit entries are kept; older ones are deleted by a periodic job. 0 keeps them
    /// forever.
    #[serde(default = "default_audit_retention_days")]
    pub audit_retention_days: u64,
    /// A device's client connection is written to the audit log when its address or user agent
    /// changes, and otherwise at most once per this many seconds.
    #[serde(default = "default_audit_connection_interval")]
    pub audit_connection_interval_secs: u64,
    /// At most this many devices (sessions) per user; a login that would create one more is
    /// refused (REQUIREMENTS C1). 0: no limit.
    #[serde(default)]
    pub max_devices_per_user: u64,
    /// Clients whose user agent matches one of these (a substring, or a glob with `*` that
    /// must match the whole user agent) get 403 on every authenticated request (C3). Empty: none.
    #[serde(default)]
    pub blocked_user_agents: Vec<String>,
    /// Minimum versions of what a client's user agent names (C3: only patched systems and
    /// apps), e.g. `[{ token = "Android", version = "12" }, { token = "Element", version =
    /// "1.6.0" }]`: a user agent with `Android 11` or `Element/1.5.2` gets 403 on every
    /// authenticated request. A user agent without the token is not affected.
    #[serde(default)]
    pub min_user_agent_versions: Vec<crate::policy::client_version::MinVersion>,
    /// Message retention (D4): the lifetime of rooms without `m.room.retention`, the bounds a
    /// room's policy is clamped into, and how often the purge job runs.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Media retention (D4): how long uploaded and cached remote media are kept.
    #[serde(default)]
    pub media_retention: MediaRetentionConfig,
    /// Presence (online/offline status) is off by default: it is personal data few need.
    #[serde(default)]
    pub allow_presence: bool,
    /// Users may publish rooms to the room directory.
    #[serde(default = "default_true")]
    pub allow_public_room_directory: bool,
    /// Other servers may read the room directory (`/publicRooms` over federation).
    #[serde(default)]
    pub allow_public_rooms_over_federation: bool,
    /// Device display names (which often name the person's phone or computer) go to other
    /// servers: in federation `/user/keys/query` and `/user/devices` answers and in device list
    /// update EDUs. Off by default (conduwuit's key of the same name and default).
    #[serde(default)]
    pub allow_device_name_federation: bool,
    /// Lifetime of an access token handed out together with a refresh token, in seconds.
    #[serde(default = "default_access_token_lifetime")]
    pub access_token_lifetime_secs: u64,
    /// tracing filter, e.g. "info" or "hafen=debug,warn".
    #[serde(default = "default_log")]
    pub log: String,
    /// What `/.well-known/matrix/client` and `/.well-known/matrix/server` answer.
    #[serde(default)]
    pub well_known: WellKnown,
    /// The operator's privacy notice (REQUIREMENTS.md A1). When set, registration requires
    /// accepting it (`m.login.terms`) and the accepted version is recorded.
    #[serde(default)]
    pub privacy_notice: Option<PrivacyNotice>,
    /// Rate limits per user and per IP.
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// Reverse proxies (IP addresses or CIDR ranges) whose `X-Forwarded-For` (or, without it,
    /// `Forwarded`) header names the client. Requests from other addresses are taken at their
    /// TCP address whatever they send. Empty (default): the headers are ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Directory of uploaded media files; unset means `<database_path>/media`.
    #[serde(default)]
    pub media_path: Option<PathBuf>,
    /// Where online backups go (`POST /_hafen/admin/v1/backup`): each one a directory named by
    /// its time with `db/` (a RocksDB checkpoint) and `media/`. Unset: no backups (`hafen audit`
    /// reports it).
    #[serde(default)]
    pub backup_path: Option<PathBuf>,
    /// Take a backup every this many seconds (the first one this long after the start). Unset:
    /// only on request. Needs `backup_path`.
    #[serde(default)]
    pub backup_interval_secs: Option<u64>,
    /// Keep only the newest this many backups below `backup_path` (older ones are deleted after
    /// each successful backup). Unset: keep all.
    #[serde(default)]
    pub backup_keep: Option<u32>,
    /// A file with the 32-byte key (64 hex digits or base64; not accessible to every user) that
    /// encrypts new media files and thumbnails at rest (REQUIREMENTS C2). Files written before it
    /// was set stay readable; `hafen media encrypt` converts them.
    #[serde(default)]
    pub media_encryption_key_file: Option<PathBuf>,
    /// A file with the key that encrypts backups (one archive each); unset: the media key, and
    /// without either, backups are plain directories.
    #[serde(default)]
    pub backup_encryption_key_file: Option<PathBuf>,
    /// Largest media upload in bytes (413 `M_TOO_LARGE` above it); announced as `m.upload.size`.
    #[serde(default = "default_max_upload_size")]
    pub max_upload_size: u64,
    /// How many `/create`d media ids a user may hold that are not uploaded yet and not expired.
    #[serde(default = "default_max_pending_media_uploads")]
    pub max_pending_media_uploads: usize,
    /// Seconds a `/create`d media id stays usable for its upload (`unused_expires_at`).
    #[serde(default = "default_pending_media_expiry_secs")]
    pub pending_media_expiry_secs: u64,
    /// The unauthenticated legacy endpoints `/_matrix/media/v3/download` and `/thumbnail` answer
    /// 404 `M_NOT_FOUND` for all media (the spec's "frozen" media). false serves media there too.
    #[serde(default = "default_true")]
    pub freeze_legacy_media: bool,
    /// Answer `/preview_url` (fetches web pages for users). Off by default.
    #[serde(default)]
    pub url_preview_enabled: bool,
    /// IP ranges (CIDR) that URL previews may reach although they are not public addresses,
    /// e.g. `["10.1.2.0/24"]` for an intranet wiki. Empty by default: only public addresses.
    #[serde(default)]
    pub url_preview_ip_range_allowlist: Vec<String>,
    /// IP ranges (CIDR) push gateways may be reached at although they are not public addresses,
    /// e.g. `["10.1.2.3/32"]` for a gateway on the LAN. Empty: pushes go to public addresses only.
    #[serde(default)]
    pub push_gateway_ip_range_allowlist: Vec<String>,
    /// Application service registration files (YAML, as bridges write them; Synapse's key).
    /// Read and checked at start: a bad file stops the start naming the file and the field.
    #[serde(default)]
    pub app_service_config_files: Vec<PathBuf>,
    /// A TLS listener (for federation, port 8448 by convention) serving the same API with this
    /// certificate chain and key. Unset: no TLS listener (put a reverse proxy in front).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Where to reach other homeservers, by server name: a base URL such as
    /// `"https://matrix.partner.example:8448"`. Names listed here skip discovery (closed
    /// deployments, tests); an `http://` URL is used as given (only for a TLS-terminating proxy
    /// on the same host, or tests).
    #[serde(default)]
    pub federation_destinations: std::collections::BTreeMap<String, String>,
    /// IP ranges (CIDR) discovered federation destinations may be at although they are not
    /// public (e.g. partners on the LAN found by name). Empty: discovered servers must be at
    /// public addresses. Servers in `federation_destinations` are reached as configured.
    #[serde(default)]
    pub federation_ip_range_allowlist: Vec<String>,
    /// A PEM file of extra CA certificates trusted for federation (a partner PKI), in addition
    /// to the system roots.
    #[serde(default)]
    pub federation_ca_file: Option<PathBuf>,
    /// TURN server URIs handed to VoIP clients by `/voip/turnServer`, e.g.
    /// `["turns:turn.example.org:5349?transport=tcp"]`. Empty: no TURN server is offered.
    #[serde(default)]
    pub turn_uris: Vec<String>,
    /// Shared secret of the TURN server (coturn `static-auth-secret`): clients get time-limited
    /// credentials derived from it. Takes precedence over `turn_username`/`turn_password`.
    #[serde(default)]
    pub turn_secret: Option<String>,
    /// Fixed TURN credentials, when the TURN server has no shared secret.
    #[serde(default)]
    pub turn_username: Option<String>,
    #[serde(default)]
    pub turn_password: Option<String>,
    /// Lifetime of TURN credentials, in seconds.
    #[serde(default = "default_turn_ttl")]
    pub turn_ttl: u64,
    /// OpenID Connect identity providers users may log in with (`[[global.oidc_providers]]`,
    /// `m.login.sso`). Empty: no SSO. See docs/sso.md.
    #[serde(default)]
    pub oidc_providers: Vec<crate::service::sso::config::OidcProvider>,
    /// Where clients may be sent back to after SSO: prefixes of `redirectUrl`, e.g.
    /// `["https://app.element.io/"]` (an app's own scheme, such as `"io.element.android:/"`, is
    /// allowed only when listed here). A listed client gets the login token at once; any other
    /// http(s) URL first gets a page asking the user whether to continue to it. Empty: every
    /// client gets that page.
    #[serde(default)]
    pub sso_client_allowlist: Vec<String>,
    /// The public base URL of this server's client API, e.g. `"https://matrix.example.org"`:
    /// the SSO callback the identity provider redirects to is built from it. Unset: taken from
    /// `well_known.client`.
    #[serde(default)]
    pub public_baseurl: Option<String>,
    /// JWT login (`org.matrix.login.jwt`): tokens signed by the organization's identity service.
    /// Unset: not offered. See docs/sso.md.
    #[serde(default)]
    pub jwt: Option<crate::service::sso::config::JwtConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WellKnown {
    /// Base URL of the client API, e.g. "https://matrix.example.org".
    pub client: Option<String>,
    /// Delegated federation server, e.g. "matrix.example.org:443".
    pub server: Option<String>,
    /// `/.well-known/matrix/support`: a web page where users get help.
    pub support_page: Option<String>,
    /// `/.well-known/matrix/support`: the admin contact's Matrix id and/or email address.
    pub support_mxid: Option<String>,
    pub support_email: Option<String>,
}

/// The privacy notice users accept at registration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyNotice {
    /// Where the notice is published (an `https://` page of the operator).
    pub url: String,
    /// Its version; a new version is a new notice to accept.
    pub version: String,
    /// Its title as clients show it; default "Privacy notice".
    #[serde(default)]
    pub name: Option<String>,
    /// Users who have not accepted this version (a new version, or accounts made before the
    /// notice) get 403 `M_CONSENT_NOT_GIVEN` with a page to accept it when they send, join,
    /// invite, create rooms, change their profile or upload. Default true.
    #[serde(default = "default_true")]
    pub block_until_accepted: bool,
}

/// `[global.retention]`: lifetimes in milliseconds, as `m.room.retention` (MSC1763) has them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Lifetime of messages in rooms without `m.room.retention` (ms). Unset: kept until a room
    /// sets a policy.
    #[serde(default)]
    pub default_max_lifetime: Option<u64>,
    /// Smallest lifetime a room's policy may ask for (ms); shorter ones are raised to it.
    #[serde(default)]
    pub allowed_min: Option<u64>,
    /// Largest lifetime (ms): longer room policies are lowered to it, and it applies to rooms
    /// without a policy too.
    #[serde(default)]
    pub allowed_max: Option<u64>,
    /// How often the purge job runs (ms); it also purges media past `media_retention`.
    #[serde(default = "default_purge_interval")]
    pub purge_interval: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            default_max_lifetime: None,
            allowed_min: None,
            allowed_max: None,
            purge_interval: default_purge_interval(),
        }
    }
}

fn default_purge_interval() -> u64 {
    60 * 60 * 1000
}

/// `[global.media_retention]`: lifetimes in milliseconds; unset keeps media forever.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediaRetentionConfig {
    /// Media uploaded by this server's users, counted from the upload.
    #[serde(default)]
    pub local_max_lifetime: Option<u64>,
    /// Other servers' media cached here, counted from when it was fetched.
    #[serde(default)]
    pub remote_max_lifetime: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain (leaf first).
    pub certs: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
    /// Port of the TLS listener; 0 picks a free one (tests).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// Seconds between checks whether `certs` or `key` changed on disk; a changed pair is
    /// loaded without a restart (a renewed certificate). 0: only on SIGHUP.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval_secs: u64,
}

fn default_tls_reload_interval() -> u64 {
    60
}

fn default_tls_port() -> u16 {
    8448
}

/// A token bucket: `per_second` refill rate and `burst` capacity.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Switch all rate limiting off (benchmarks).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Password checks (login, re-authentication with `m.login.password`) per client address
    /// (an IPv6 client by its /64).
    #[serde(default = "default_rl_login")]
    pub login: RateLimit,
    /// Failed password checks per account and client address: only failures take from it, so
    /// the owner logging in from elsewhere is never locked out by someone guessing, and it
    /// refills on its own.
    #[serde(default = "default_rl_login_failures")]
    pub login_failures: RateLimit,
    #[serde(default = "default_rl_registration")]
    pub registration: RateLimit,
    #[serde(default = "default_rl_message")]
    pub message: RateLimit,
    /// Notary key queries (`/_matrix/key/v2/query`), per IP address: each may make this server
    /// fetch other servers' keys.
    #[serde(default = "default_rl_key_query")]
    pub key_query: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: true,
            login: default_rl_login(),
            login_failures: default_rl_login_failures(),
            registration: default_rl_registration(),
            message: default_rl_message(),
            key_query: default_rl_key_query(),
        }
    }
}

fn default_server_name() -> OwnedServerName {
    "localhost".try_into().expect("static server name is valid")
}
fn default_address() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_port() -> u16 {
    8008
}
fn default_database_path() -> PathBuf {
    PathBuf::from("./data")
}
fn default_database_backend() -> String {
    "rocksdb".to_owned()
}
pub(crate) fn default_true() -> bool {
    true
}
fn default_rocksdb_compression() -> String {
    "lz4".to_owned()
}

fn default_db_cache_capacity_mb() -> u64 {
    64
}
fn default_max_request_size() -> usize {
    20 * 1024 * 1024
}
fn default_max_upload_size() -> u64 {
    50 * 1024 * 1024
}
fn default_max_pending_media_uploads() -> usize {
    5
}
fn default_pending_media_expiry_secs() -> u64 {
    24 * 3600
}
fn default_turn_ttl() -> u64 {
    24 * 3600
}
fn default_room_version() -> RoomVersionId {
    RoomVersionId::V12
}
fn default_audit_retention_days() -> u64 {
    180
}
fn default_audit_connection_interval() -> u64 {
    600
}
fn default_access_token_lifetime() -> u64 {
    3600
}
fn default_log() -> String {
    "info".to_owned()
}
fn default_rl_login() -> RateLimit {
    RateLimit {
        per_second: 0.5,
        burst: 10,
    }
}
fn default_rl_login_failures() -> RateLimit {
    RateLimit {
        per_second: 0.05,
        burst: 5,
    }
}
fn default_rl_registration() -> RateLimit {
    RateLimit {
        per_second: 0.2,
        burst: 5,
    }
}
fn default_rl_message() -> RateLimit {
    RateLimit {
        per_second: 10.0,
        burst: 50,
    }
}
fn default_rl_key_query() -> RateLimit {
    RateLimit {
        per_second: 1.0,
        burst: 20,
    }
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("an empty config takes every default")
    }
}

/// What loading produced: the config plus warnings (unknown keys) to log once logging is up.
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Load the config from `path` (a missing default file means "all defaults"), apply `HAFEN_*`
/// environment overrides from `env`, and validate.
pub fn load(
    path: Option<&std::path::Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })?,
        None => match std::fs::read_to_string("conduit-config.toml") {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: "conduit-config.toml".into(),
                    source,
                })
            }
        },
    };
    from_toml_str(&text, env)
}

/// Parse config text plus environment overrides. Separate from [`load`] for tests.
pub fn from_toml_str(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let mut root: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let mut warnings = Vec::new();
    for key in root.keys() {
        if key != "global" {
            warnings.push(format!("unknown config section or key `{key}` (ignored)"));
        }
    }
    let mut global = match root.remove("global") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(ConfigError::Invalid("`global` must be a table".into())),
        None => toml::Table::new(),
    };
    for (name, value) in env {
        let Some(key) = name.strip_prefix("HAFEN_") else {
            continue;
        };
        if key == "CONFIG" || key.is_empty() {
            continue;
        }
        let path: Vec<String> = key.split("__").map(|s| s.to_ascii_lowercase()).collect();
        // A value is read as TOML if it parses (numbers, booleans, arrays), else as a plain string.
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        insert_path(&mut global, &path, parsed);
    }

    // Collect unknown keys as warnings instead of failing: a newer config on an older binary
    // should still start, and the operator sees exactly which key is ignored.
    let mut unknown = Vec::new();
    let known = strip_unknown(&mut global, &mut unknown);
    for key in unknown {
        warnings.push(format!("unknown config key `global.{key}` (ignored)"));
    }
    // Lay the given keys over the defaults, so a partial nested table (one field of a rate
    // limit, say) keeps the other defaults; then parse the text, whose errors quote the line.
    let mut merged = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    merge(&mut merged, known);
    let text = toml::to_string(&merged).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    validate(&config)?;
    Ok(Loaded { config, warnings })
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                insert_path(t, rest, value);
            }
        }
    }
}

/// Removes keys the config struct does not know, by serializing a default config and comparing
/// key sets, so the list of known keys has exactly one source: the struct itself.
fn strip_unknown(global: &mut toml::Table, unknown: &mut Vec<String>) -> toml::Table {
    let reference = toml::Table::try_from(Config::default_for_keys()).unwrap_or_default();
    fn walk(
        given: &toml::Table,
        known: &toml::Table,
        prefix: &str,
        unknown: &mut Vec<String>,
    ) -> toml::Table {
        let mut out = toml::Table::new();
        for (k, v) in given {
            let full = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match known.get(k) {
                None => unknown.push(full),
                Some(toml::Value::Table(kt)) if v.is_table() && !is_free_form(&full) => {
                    if let toml::Value::Table(gt) = v {
                        out.insert(k.clone(), toml::Value::Table(walk(gt, kt, &full, unknown)));
                    }
                }
                Some(_) => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        out
    }
    walk(global, &reference, "", unknown)
}

/// Tables whose keys are data, not config keys.
fn is_free_form(key: &str) -> bool {
    key == "federation_destinations"
}

impl Config {
    /// A config with every optional key set, so that serializing it lists every key.
    // Key by key, as the config file lists them.
    #[allow(clippy::field_reassign_with_default)]
    pub fn default_for_keys() -> Config {
        let mut c = Config::default();
        c.registration_token = Some(String::new());
        c.well_known.client = Some(String::new());
        c.well_known.server = Some(String::new());
        c.media_path = Some(PathBuf::new());
        c.backup_path = Some(PathBuf::new());
        c.backup_interval_secs = Some(0);
        c.backup_keep = Some(0);
        c.media_encryption_key_file = Some(PathBuf::new());
        c.backup_encryption_key_file = Some(PathBuf::new());
        c.well_known.support_page = Some(String::new());
        c.well_known.support_mxid = Some(String::new());
        c.well_known.support_email = Some(String::new());
        c.turn_secret = Some(String::new());
        c.federation_ca_file = Some(PathBuf::new());
        c.tls = Some(TlsConfig {
            certs: PathBuf::new(),
            key: PathBuf::new(),
            port: default_tls_port(),
            reload_interval_secs: default_tls_reload_interval(),
        });
        c.turn_username = Some(String::new());
        c.turn_password = Some(String::new());
        c.policy_hook = Some(crate::policy::hook::PolicyHookConfig::default());
        c.privacy_notice = Some(PrivacyNotice {
            url: String::new(),
            version: String::new(),
            name: Some(String::new()),
            block_until_accepted: true,
        });
        c.retention.default_max_lifetime = Some(0);
        c.retention.allowed_min = Some(0);
        c.retention.allowed_max = Some(0);
        c.media_retention.local_max_lifetime = Some(0);
        c.media_retention.remote_max_lifetime = Some(0);
        c.public_baseurl = Some(String::new());
        c.jwt = Some(crate::service::sso::config::JwtConfig::for_keys());
        c
    }

    /// Where media files live: `media_path`, or `<database_path>/media`.
    pub fn media_dir(&self) -> PathBuf {
        self.media_path
            .clone()
            .unwrap_or_else(|| self.database_path.join("media"))
    }

    /// Every key path of the config, e.g. `rate_limits.login.burst`; used by the docs check.
    pub fn all_key_paths() -> Vec<String> {
        fn walk(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                let full = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if let (toml::Value::Table(inner), false) = (v, is_free_form(&full)) {
                    walk(inner, &full, out);
                } else {
                    out.push(full);
                }
            }
        }
        let mut out = Vec::new();
        if let Ok(t) = toml::Table::try_from(Config::default_for_keys()) {
            walk(&t, "", &mut out);
        }
        out
    }
}

fn validate(c: &Config) -> Result<(), ConfigError> {
    if c.database_backend != "rocksdb" {
        return Err(ConfigError::Invalid(format!(
            "database_backend: `{}` is not supported; the only backend is `rocksdb`",
            c.database_backend
        )));
    }
    if !matches!(c.rocksdb_compression_algo.as_str(), "lz4" | "none") {
        return Err(ConfigError::Invalid(format!(
            "rocksdb_compression_algo: `{}` is not supported; use \"lz4\" or \"none\"",
            c.rocksdb_compression_algo
        )));
    }
    if c.max_request_size < 1024 {
        return Err(ConfigError::Invalid(
            "max_request_size: must be at least 1024 bytes".into(),
        ));
    }
    if c.backup_interval_secs == Some(0) {
        return Err(ConfigError::Invalid(
            "backup_interval_secs: must be at least 1 (seconds); leave it unset for no schedule"
                .into(),
        ));
    }
    if c.backup_keep == Some(0) {
        return Err(ConfigError::Invalid(
            "backup_keep: must be at least 1; leave it unset to keep every backup".into(),
        ));
    }
    if c.backup_interval_secs.is_some() && c.backup_path.is_none() {
        return Err(ConfigError::Invalid(
            "backup_interval_secs: needs backup_path (where the backups go)".into(),
        ));
    }
    for m in &c.min_user_agent_versions {
        if m.token.trim().is_empty()
            || crate::policy::client_version::parse_version(&m.version).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "min_user_agent_versions: `{}` needs a token and a version of dot-separated numbers (got `{}`)",
                m.token, m.version
            )));
        }
    }
    if c.retention.purge_interval < 1000 {
        return Err(ConfigError::Invalid(
            "retention.purge_interval: must be at least 1000 (milliseconds)".into(),
        ));
    }
    if let (Some(min), Some(max)) = (c.retention.allowed_min, c.retention.allowed_max) {
        if min > max {
            return Err(ConfigError::Invalid(
                "retention.allowed_min: must not be larger than retention.allowed_max".into(),
            ));
        }
    }
    if c.default_room_version.rules().is_none() {
        return Err(ConfigError::Invalid(format!(
            "default_room_version: `{}` is not a room version Hafen supports (1-12)",
            c.default_room_version
        )));
    }
    for (name, rl) in [
        ("login", c.rate_limits.login),
        ("login_failures", c.rate_limits.login_failures),
        ("registration", c.rate_limits.registration),
        ("message", c.rate_limits.message),
        ("key_query", c.rate_limits.key_query),
    ] {
        if rl.per_second.is_nan() || rl.per_second <= 0.0 || rl.burst == 0 {
            return Err(ConfigError::Invalid(format!(
                "rate_limits.{name}: per_second must be > 0 and burst >= 1"
            )));
        }
    }
    if let Some(p) = &c.privacy_notice {
        let web = p.url.starts_with("https://") || p.url.starts_with("http://");
        if !web || p.version.is_empty() || p.version.len() > 64 || p.url.len() > 2048 {
            return Err(ConfigError::Invalid(
                "privacy_notice: needs an http(s) `url` and a non-empty `version` (at most 64 characters)"
                    .into(),
            ));
        }
    }
    if let Some(t) = &c.registration_token {
        if t.is_empty() {
            return Err(ConfigError::Invalid(
                "registration_token: must not be empty".into(),
            ));
        }
    }
    crate::policy::groups::validate(&c.groups, &c.group_contact).map_err(ConfigError::Invalid)?;
    if let Some(h) = &c.policy_hook {
        crate::policy::hook::validate(h).map_err(ConfigError::Invalid)?;
    }
    if c.access_token_lifetime_secs < 60 {
        return Err(ConfigError::Invalid(
            "access_token_lifetime_secs: must be at least 60".into(),
        ));
    }
    if c.pending_media_expiry_secs == 0 {
        return Err(ConfigError::Invalid(
            "pending_media_expiry_secs: must be at least 1".into(),
        ));
    }
    for range in c
        .url_preview_ip_range_allowlist
        .iter()
        .chain(&c.push_gateway_ip_range_allowlist)
        .chain(&c.federation_ip_range_allowlist)
    {
        if range.parse::<ipnet::IpNet>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "ip range allowlist: `{range}` is not an IP range like 10.0.0.0/8"
            )));
        }
    }
    for p in &c.trusted_proxies {
        if crate::api::forwarded::parse_range(p).is_none() {
            return Err(ConfigError::Invalid(format!(
                "trusted_proxies: `{p}` is not an IP address or range like 10.0.0.0/8"
            )));
        }
    }
    crate::service::sso::config::validate(c).map_err(ConfigError::Invalid)?;
    tracing_subscriber::EnvFilter::try_new(&c.log)
        .map_err(|e| ConfigError::Invalid(format!("log: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_defaults() {
        let l = from_toml_str("", Vec::new()).unwrap();
        assert_eq!(l.config.server_name.as_str(), "localhost");
        assert_eq!(l.config.port, 8008);
        assert!(!l.config.allow_registration);
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn unknown_key_is_a_warning_naming_it() {
        let l = from_toml_str("[global]\nport = 9000\nfrobnicate = 1\n", Vec::new()).unwrap();
        assert_eq!(l.config.port, 9000);
        assert_eq!(
            l.warnings,
            vec!["unknown config key `global.frobnicate` (ignored)"]
        );
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            ("HAFEN_PORT".to_owned(), "9100".to_owned()),
            ("HAFEN_SERVER_NAME".to_owned(), "example.org".to_owned()),
            (
                "HAFEN_RATE_LIMITS__LOGIN__BURST".to_owned(),
                "99".to_owned(),
            ),
        ];
        let l = from_toml_str("[global]\nport = 9000\n", env).unwrap();
        assert_eq!(l.config.port, 9100);
        assert_eq!(l.config.server_name.as_str(), "example.org");
        assert_eq!(l.config.rate_limits.login.burst, 99);
    }

    #[test]
    fn invalid_value_names_the_key() {
        let e = from_toml_str("[global]\nport = \"eighty\"\n", Vec::new())
            .err()
            .unwrap();
        assert!(e.to_string().contains("port"), "{e}");
        let e = from_toml_str("[global]\ndefault_room_version = \"99\"\n", Vec::new())
            .err()
            .unwrap();
        assert!(e.to_string().contains("default_room_version"), "{e}");
    }
}
