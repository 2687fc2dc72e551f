//! Where another server is reached: the configured map first, then the spec's discovery
//! without DNS SRV (not built yet): an IP literal or an explicit port is used as is; otherwise
//! `/.well-known/matrix/server` may delegate (cached for a day, failures for ten minutes);
//! otherwise the name on port 8448.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::ServerName;
use serde_json::Value;

use crate::{config::Config, error::Result};

const WELL_KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_FAILURE_TTL: Duration = Duration::from_secs(600);
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Servers whose discovery is remembered at most.
const MAX_CACHED: usize = 10_000;

/// Where a server is reached, and whether the operator pinned it (`federation_destinations`).
pub struct Destination {
    pub url: String,
    pub pinned: bool,
}

pub struct Destinations {
    configured: BTreeMap<String, String>,
    client: reqwest::Client,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl Destinations {
    pub fn new(config: &Config, client: reqwest::Client) -> Destinations {
        Destinations {
            configured: config
                .federation_destinations
                .iter()
                .map(|(k, v)| (k.clone(), v.trim_end_matches('/').to_owned()))
                .collect(),
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The base URL (scheme, host, port; no trailing slash) requests to `server` go to.
    pub async fn base_url(&self, server: &ServerName) -> Result<Destination> {
        if let Some(url) = self.configured.get(server.as_str()) {
            return Ok(Destination {
                url: url.clone(),
                pinned: true,
            });
        }
        let discovered = |url: String| Ok(Destination { url, pinned: false });
        if server.is_ip_literal() || server.port().is_some() {
            let host = server.host();
            let port = server.port().unwrap_or(8448);
            return discovered(format!("https://{host}:{port}"));
        }
        if let Some((url, until)) = self.cache.lock().get(server.as_str()) {
            if *until > Instant::now() {
                return discovered(url.clone());
            }
        }
        let (url, ttl) = match self.well_known(server).await {
            Some(delegated) => (delegated, WELL_KNOWN_TTL),
            None => (
                format!("https://{}:8448", server.host()),
                WELL_KNOWN_FAILURE_TTL,
            ),
        };
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(server.to_string(), (url.clone(), Instant::now() + ttl));
        discovered(url)
    }

    /// `m.server` of the name's well-known document, as a base URL (port 8448 if none).
    async fn well_known(&self, server: &ServerName) -> Option<String> {
        let url = format!("https://{}/.well-known/matrix/server", server.host());
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
        let delegated = doc.get("m.server")?.as_str()?;
        delegated_base(delegated)
    }
}

/// The base URL for a well-known `m.server` value (`host`, `host:port`, `[v6]:port`).
fn delegated_base(value: &str) -> Option<String> {
    let name = <&ServerName>::try_from(value).ok()?;
    Some(format!(
        "https://{}:{}",
        name.host(),
        name.port().unwrap_or(8448)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegation_values() {
        assert_eq!(
            delegated_base("matrix.example.org").as_deref(),
            Some("https://matrix.example.org:8448")
        );
        assert_eq!(
            delegated_base("matrix.example.org:443").as_deref(),
            Some("https://matrix.example.org:443")
        );
        assert_eq!(
            delegated_base("[::1]:8448").as_deref(),
            Some("https://[::1]:8448")
        );
        assert_eq!(delegated_base("not a name"), None);
    }
}
