//! Where another server is reached: the configured map first, then the spec's server discovery,
//! in its order:
//!
//! 1. an IP literal: that address, at the given port or 8448;
//! 2. a host name with a port: that host and port;
//! 3. `https://<name>/.well-known/matrix/server` delegating to `<delegated>[:<port>]`: an IP
//!    literal or a port is used as is; otherwise the SRV records of the delegated name
//!    (`_matrix-fed._tcp.<delegated>`, then the deprecated `_matrix._tcp.<delegated>`), otherwise
//!    the delegated name on port 8448;
//! 4. no delegation: the SRV records of the name itself (`_matrix-fed._tcp`, then `_matrix._tcp`);
//! 5. otherwise the name on port 8448.
//!
//! With an SRV record the request goes to the record's target and port, but the TLS certificate
//! is checked for the (delegated) server name and `Host:` names it: the URL keeps the name (so
//! rustls checks it) with the SRV port, and [`Destination::connect_to`] tells the caller to
//! connect to the target's addresses instead (`federation::Federation` builds a client whose DNS
//! for that one name is overridden, with the addresses passed through the address guard).
//!
//! Results are cached per server name: a delegation for a day, failed lookups for ten minutes,
//! and anything found through SRV no longer than the record's TTL (at most [`MAX_CACHED`]
//! names).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::ServerName;
use serde_json::Value;

use crate::{config::Config, error::Result};

const WELL_KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_FAILURE_TTL: Duration = Duration::from_secs(600);
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one SRV query may take (the resolver retries within it).
const SRV_TIMEOUT: Duration = Duration::from_secs(10);
/// An SRV answer is remembered at least this long (a zero TTL would mean a query per request).
const MIN_SRV_TTL: Duration = Duration::from_secs(60);
/// Servers whose discovery is remembered at most.
const MAX_CACHED: usize = 10_000;

/// Where a server is reached, and whether the operator pinned it (`federation_destinations`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Scheme, host and port, no trailing slash. The host is the name the TLS certificate must
    /// be valid for.
    pub url: String,
    pub pinned: bool,
    /// Found through SRV: connect to this host (the record's target) at the URL's port, while
    /// TLS and `Host:` name the URL's host.
    pub connect_to: Option<String>,
    /// The `Host:` header to send when it differs from what the URL gives (SRV: the name
    /// without the record's port).
    pub host_header: Option<String>,
}

/// One SRV record, as far as discovery needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Host name, without the final dot.
    pub target: String,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What discovery asks the outside world: the well-known document and DNS. The real one is
/// [`Destinations`]; tests hand in their own to check the order of the steps.
pub trait Lookups: Send + Sync {
    /// The `m.server` value of `https://<host>/.well-known/matrix/server`, if there is one.
    fn well_known<'a>(&'a self, host: &'a str) -> BoxFut<'a, Option<String>>;
    /// The SRV records of `name` (e.g. `_matrix-fed._tcp.example.org`) and how long they may be
    /// kept; `None` when there are none or the lookup failed.
    fn srv<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<(Vec<SrvRecord>, Duration)>>;
}

/// The outcome of discovery for a name that is not pinned, and how long it may be kept.
#[derive(Debug, PartialEq, Eq)]
pub struct Discovered {
    pub destination: Destination,
    pub ttl: Duration,
}

fn direct(host: &str, port: u16) -> Destination {
    Destination {
        url: format!("https://{host}:{port}"),
        pinned: false,
        connect_to: None,
        host_header: None,
    }
}

/// The record to use: the lowest priority, and among those the highest weight (the first of
/// them when equal). A target of "." means "no service here" (and so does any other target
/// that is nothing but dots: there is no host to connect to).
fn pick_srv(records: &[SrvRecord]) -> Option<&SrvRecord> {
    records
        .iter()
        .filter(|r| !r.target.trim_end_matches('.').is_empty())
        .min_by_key(|r| (r.priority, std::cmp::Reverse(r.weight)))
}

/// Steps 3.3 to 3.5 and 4 to 5: the SRV records of `host` (a name without port), newest
/// service name first, otherwise port 8448.
async fn via_srv(lookups: &dyn Lookups, host: &str, ttl: Duration) -> Discovered {
    for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
        let name = format!("{service}.{host}");
        let Some((records, srv_ttl)) = lookups.srv(&name).await else {
            continue;
        };
        if let Some(record) = pick_srv(&records) {
            return Discovered {
                destination: Destination {
                    url: format!("https://{host}:{}", record.port),
                    pinned: false,
                    connect_to: Some(record.target.trim_end_matches('.').to_owned()),
                    host_header: Some(host.to_owned()),
                },
                ttl: ttl.min(srv_ttl.max(MIN_SRV_TTL)),
            };
        }
    }
    Discovered {
        destination: direct(host, 8448),
        ttl,
    }
}

/// The spec's discovery for a server name (see the module comment), with `lookups` for the
/// well-known document and DNS.
pub async fn discover(lookups: &dyn Lookups, server: &ServerName) -> Discovered {
    let host = server.host();
    if server.is_ip_literal() || server.port().is_some() {
        return Discovered {
            destination: direct(host, server.port().unwrap_or(8448)),
            ttl: WELL_KNOWN_TTL,
        };
    }
    if let Some(value) = lookups.well_known(host).await {
        // A delegation that is no server name, or none a URL can name (`0.0.256.0` is a
        // server name but no host), counts as none: the spec's "invalid response".
        if let Some(delegated) = <&ServerName>::try_from(value.as_str())
            .ok()
            .filter(|d| usable(d))
        {
            if delegated.is_ip_literal() || delegated.port().is_some() {
                return Discovered {
                    destination: direct(delegated.host(), delegated.port().unwrap_or(8448)),
                    ttl: WELL_KNOWN_TTL,
                };
            }
            return via_srv(lookups, delegated.host(), WELL_KNOWN_TTL).await;
        }
    }
    via_srv(lookups, host, WELL_KNOWN_FAILURE_TTL).await
}

/// The `m.server` of a `/.well-known/matrix/server` document (checked as a server name by
/// [`discover`]).
fn delegated_name(doc: &Value) -> Option<&str> {
    doc.get("m.server")?.as_str()
}

/// Whether an `https` URL can name `server` (ruma accepts some names, such as `0.0.256.0`, that
/// a URL parser refuses as a broken IPv4 address).
fn usable(server: &ServerName) -> bool {
    url::Url::parse(&format!("https://{server}/")).is_ok()
}

pub struct Destinations {
    configured: BTreeMap<String, String>,
    client: reqwest::Client,
    /// The system's DNS resolver (`/etc/resolv.conf`), for SRV records; `None` when it could
    /// not be set up (then discovery goes on without SRV).
    dns: Option<hickory_resolver::TokioResolver>,
    cache: Mutex<HashMap<String, (Destination, Instant)>>,
}

impl Destinations {
    pub fn new(config: &Config, client: reqwest::Client) -> Destinations {
        let dns = match hickory_resolver::Resolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("no DNS resolver for SRV lookups, discovery goes without: {e}");
                None
            }
        };
        Destinations {
            configured: config
                .federation_destinations
                .iter()
                .map(|(k, v)| (k.clone(), v.trim_end_matches('/').to_owned()))
                .collect(),
            client,
            dns,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Where requests to `server` go.
    pub async fn base_url(&self, server: &ServerName) -> Result<Destination> {
        if let Some(url) = self.configured.get(server.as_str()) {
            return Ok(Destination {
                url: url.clone(),
                pinned: true,
                connect_to: None,
                host_header: None,
            });
        }
        if let Some((dest, until)) = self.cache.lock().get(server.as_str()) {
            if *until > Instant::now() {
                return Ok(dest.clone());
            }
        }
        let found = discover(self, server).await;
        self.remember(server, found.destination.clone(), found.ttl);
        Ok(found.destination)
    }

    /// Remember where `server` is reached for `ttl`, as discovery would (tests use it to stand
    /// in for DNS answers there is no server for).
    pub fn remember(&self, server: &ServerName, destination: Destination, ttl: Duration) {
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(server.to_string(), (destination, Instant::now() + ttl));
    }

    async fn fetch_well_known(&self, host: &str) -> Option<String> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let response = self
            .client
            .get(url)
            .timeout(WELL_KNOWN_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let doc: Value = super::read_json(response).await.ok()?;
        delegated_name(&doc).map(str::to_owned)
    }

    async fn lookup_srv(&self, name: &str) -> Option<(Vec<SrvRecord>, Duration)> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let dns = self.dns.as_ref()?;
        // A fully qualified name: no search domains appended.
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = tokio::time::timeout(SRV_TIMEOUT, dns.lookup(fqdn, RecordType::SRV))
            .await
            .ok()?
            .ok()?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        let records: Vec<SrvRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(SrvRecord {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: srv.target.to_ascii().trim_end_matches('.').to_owned(),
                }),
                _ => None,
            })
            .take(100)
            .collect();
        if records.is_empty() {
            None
        } else {
            Some((records, ttl))
        }
    }
}

impl Lookups for Destinations {
    fn well_known<'a>(&'a self, host: &'a str) -> BoxFut<'a, Option<String>> {
        Box::pin(self.fetch_well_known(host))
    }
    fn srv<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<(Vec<SrvRecord>, Duration)>> {
        Box::pin(self.lookup_srv(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Canned answers, and the questions asked in order.
    #[derive(Default)]
    struct Fake {
        well_known: HashMap<String, String>,
        srv: HashMap<String, Vec<SrvRecord>>,
        asked: Mutex<Vec<String>>,
    }

    impl Lookups for Fake {
        fn well_known<'a>(&'a self, host: &'a str) -> BoxFut<'a, Option<String>> {
            self.asked.lock().push(format!("well-known {host}"));
            Box::pin(async move { self.well_known.get(host).cloned() })
        }
        fn srv<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<(Vec<SrvRecord>, Duration)>> {
            self.asked.lock().push(format!("srv {name}"));
            Box::pin(async move {
                self.srv
                    .get(name)
                    .map(|r| (r.clone(), Duration::from_secs(300)))
            })
        }
    }

    fn rec(priority: u16, weight: u16, target: &str, port: u16) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port,
            target: target.to_owned(),
        }
    }

    async fn run(fake: &Fake, name: &str) -> (Discovered, Vec<String>) {
        let server = <&ServerName>::try_from(name).expect("name");
        let found = discover(fake, server).await;
        (found, std::mem::take(&mut *fake.asked.lock()))
    }

    fn plain(url: &str) -> Destination {
        Destination {
            url: url.to_owned(),
            pinned: false,
            connect_to: None,
            host_header: None,
        }
    }

    fn srv_dest(url: &str, target: &str, host: &str) -> Destination {
        Destination {
            url: url.to_owned(),
            pinned: false,
            connect_to: Some(target.to_owned()),
            host_header: Some(host.to_owned()),
        }
    }

    #[tokio::test]
    async fn literals_and_ports_ask_nothing() {
        let fake = Fake::default();
        for (name, url) in [
            ("1.2.3.4", "https://1.2.3.4:8448"),
            ("1.2.3.4:99", "https://1.2.3.4:99"),
            ("[2001:db8::1]", "https://[2001:db8::1]:8448"),
            ("example.org:443", "https://example.org:443"),
        ] {
            let (found, asked) = run(&fake, name).await;
            assert_eq!(found.destination, plain(url), "{name}");
            assert!(asked.is_empty(), "{name}: {asked:?}");
        }
    }

    #[tokio::test]
    async fn without_delegation_srv_then_deprecated_srv_then_8448() {
        let mut fake = Fake::default();
        let (found, asked) = run(&fake, "example.org").await;
        assert_eq!(found.destination, plain("https://example.org:8448"));
        assert_eq!(found.ttl, WELL_KNOWN_FAILURE_TTL);
        assert_eq!(
            asked,
            [
                "well-known example.org",
                "srv _matrix-fed._tcp.example.org",
                "srv _matrix._tcp.example.org"
            ]
        );

        // Only the deprecated record.
        fake.srv.insert(
            "_matrix._tcp.example.org".into(),
            vec![rec(10, 0, "old.example.org", 8000)],
        );
        let (found, asked) = run(&fake, "example.org").await;
        assert_eq!(
            found.destination,
            srv_dest("https://example.org:8000", "old.example.org", "example.org")
        );
        assert_eq!(asked.len(), 3);

        // The current one wins, and is used without asking for the deprecated one; lowest
        // priority first, then highest weight.
        fake.srv.insert(
            "_matrix-fed._tcp.example.org".into(),
            vec![
                rec(20, 100, "backup.example.org", 1),
                rec(10, 5, "light.example.org", 2),
                rec(10, 50, "fed.example.org.", 8449),
            ],
        );
        let (found, asked) = run(&fake, "example.org").await;
        assert_eq!(
            found.destination,
            srv_dest("https://example.org:8449", "fed.example.org", "example.org")
        );
        assert_eq!(found.ttl, Duration::from_secs(300));
        assert_eq!(
            asked,
            ["well-known example.org", "srv _matrix-fed._tcp.example.org"]
        );

        // "." means no service: on to the next step; a target of only dots names no host
        // either (it was taken as the empty host name).
        fake.srv.insert(
            "_matrix-fed._tcp.example.org".into(),
            vec![rec(0, 0, ".", 0), rec(0, 0, "..", 1)],
        );
        let (found, _) = run(&fake, "example.org").await;
        assert_eq!(
            found.destination.connect_to.as_deref(),
            Some("old.example.org")
        );
    }

    #[tokio::test]
    async fn delegation_comes_before_srv_and_is_itself_looked_up() {
        let mut fake = Fake::default();
        // SRV of the original name is not asked once well-known delegates.
        fake.srv.insert(
            "_matrix-fed._tcp.example.org".into(),
            vec![rec(0, 0, "wrong.example.org", 1)],
        );
        fake.well_known
            .insert("example.org".into(), "matrix.example.net".into());
        let (found, asked) = run(&fake, "example.org").await;
        assert_eq!(found.destination, plain("https://matrix.example.net:8448"));
        assert_eq!(found.ttl, WELL_KNOWN_TTL);
        assert_eq!(
            asked,
            [
                "well-known example.org",
                "srv _matrix-fed._tcp.matrix.example.net",
                "srv _matrix._tcp.matrix.example.net"
            ]
        );

        // The delegated name's SRV record: connect to its target, TLS and Host for the
        // delegated name.
        fake.srv.insert(
            "_matrix-fed._tcp.matrix.example.net".into(),
            vec![rec(0, 0, "node1.example.net", 4443)],
        );
        let (found, _) = run(&fake, "example.org").await;
        assert_eq!(
            found.destination,
            srv_dest(
                "https://matrix.example.net:4443",
                "node1.example.net",
                "matrix.example.net"
            )
        );

        // A delegated port or IP literal is used as is, without SRV.
        for (value, url) in [
            ("matrix.example.net:443", "https://matrix.example.net:443"),
            ("10.1.2.3", "https://10.1.2.3:8448"),
            ("[2001:db8::2]:9000", "https://[2001:db8::2]:9000"),
        ] {
            fake.well_known.insert("example.org".into(), value.into());
            let (found, asked) = run(&fake, "example.org").await;
            assert_eq!(found.destination, plain(url), "{value}");
            assert_eq!(asked, ["well-known example.org"], "{value}");
        }

        // A delegation that is not a server name counts as none, and so does one no URL can
        // name (found by `fuzz_discovery_ends_at_a_bounded_https_url`).
        for value in ["not a name", "0.0.256.0"] {
            fake.well_known.insert("example.org".into(), value.into());
            let (found, _) = run(&fake, "example.org").await;
            assert_eq!(
                found.destination,
                srv_dest("https://example.org:1", "wrong.example.org", "example.org"),
                "{value}"
            );
        }
    }
}

/// Property tests: whatever the well-known document and DNS answer, discovery ends at an
/// `https` URL of the name (or its delegation), kept for a bounded time.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, json, server_name, text};

    /// Answers as another server's operator (or an attacker on the path) may give them.
    #[derive(Debug, Clone)]
    struct Answers {
        well_known: Option<String>,
        srv: Option<(Vec<SrvRecord>, Duration)>,
        srv_old: Option<(Vec<SrvRecord>, Duration)>,
    }

    impl Lookups for Answers {
        fn well_known<'a>(&'a self, _: &'a str) -> BoxFut<'a, Option<String>> {
            Box::pin(async move { self.well_known.clone() })
        }
        fn srv<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<(Vec<SrvRecord>, Duration)>> {
            let answer = if name.starts_with("_matrix-fed.") {
                self.srv.clone()
            } else {
                self.srv_old.clone()
            };
            Box::pin(async move { answer })
        }
    }

    fn records() -> impl Strategy<Value = Option<(Vec<SrvRecord>, Duration)>> {
        let record = (
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            prop_oneof![server_name(), text(), Just(".".to_owned())],
        )
            .prop_map(|(priority, weight, port, target)| SrvRecord {
                priority,
                weight,
                port,
                target,
            });
        prop::option::of((
            prop::collection::vec(record, 0..6),
            prop_oneof![Just(0u64), any::<u64>(), 0u64..100_000].prop_map(Duration::from_secs),
        ))
    }

    fn answers() -> impl Strategy<Value = Answers> {
        (prop::option::of(server_name()), records(), records()).prop_map(
            |(well_known, srv, srv_old)| Answers {
                well_known,
                srv,
                srv_old,
            },
        )
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_discovery_ends_at_a_bounded_https_url(name in server_name(), answers in answers()) {
            let Ok(server) = <&ServerName>::try_from(name.as_str()) else {
                return Ok(());
            };
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            let found = rt.block_on(discover(&answers, server));
            let d = &found.destination;
            if !usable(server) {
                // Nothing to reach: requests to it fail at the URL (no panic, no other host).
                return Ok(());
            }
            prop_assert!(found.ttl >= MIN_SRV_TTL && found.ttl <= WELL_KNOWN_TTL, "{:?}", found.ttl);
            prop_assert!(!d.pinned);
            let url = url::Url::parse(&d.url).expect("a URL");
            prop_assert_eq!(url.scheme(), "https");
            prop_assert!(url.host().is_some());
            prop_assert!(url.path() == "/" && url.query().is_none());
            // The name the certificate is checked for is the server's or its delegation's.
            let delegated = answers.well_known.as_deref().and_then(|w| <&ServerName>::try_from(w).ok()).filter(|w| usable(w));
            let host = d.url.trim_start_matches("https://").rsplit_once(':').map(|(h, _)| h);
            prop_assert!(
                host == Some(server.host()) || delegated.is_some_and(|w| host == Some(w.host())),
                "{} for {} ({:?})", d.url, server, answers.well_known
            );
            if let Some(target) = &d.connect_to {
                prop_assert!(!target.is_empty() && !target.ends_with('.'));
                prop_assert_eq!(d.host_header.as_deref(), host);
            }
        }

        #[test]
        fn fuzz_well_known_documents(doc in json(), name in server_name()) {
            let _ = delegated_name(&doc);
            let doc = serde_json::json!({ "m.server": name });
            prop_assert_eq!(delegated_name(&doc), Some(name.as_str()));
        }
    }
}
