//! Federation: reaching other homeservers and proving who we are to them, and checking who
//! they are (groundwork for issue 5).
//!
//! - `destination`: where a server name is reached (configured map, IP literals and ports,
//!   `/.well-known/matrix/server` delegation, port 8448).
//! - `keys`: other servers' signing keys, fetched from them, self-signature checked, cached
//!   until their `valid_until_ts`.
//! - `auth`: the `X-Matrix` request signature, made for outgoing requests and checked on
//!   incoming ones.
//! - `sender`: the persistent outgoing queue and the task sending it as `/send` transactions.
//! - `edu`: EDUs both ways (built for local changes; applied when received).
//! - `incoming`: room events (PDUs) received in `/send` transactions.

pub mod auth;
pub mod backfill;
pub mod destination;
pub mod edu;
pub mod incoming;
pub mod invite;
pub mod join;
pub mod keys;
pub mod media;
pub mod pdu;
pub mod resident;
pub mod sender;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use ruma::ServerName;
use serde_json::Value;

use crate::{
    config::Config,
    error::{ErrCode, Error, Result},
    service::globals::Globals,
    service::media::addr::{may_connect, parse_ranges, url_allowed, GuardedResolver},
    storage::Storage,
};

use super::inflight::InFlight;

/// Incoming transactions of one origin applied at once (the spec's senders send one at a time,
/// so a well-behaved server never meets this limit).
pub const TXNS_IN_FLIGHT_PER_ORIGIN: usize = 8;

/// Timeout of one request to another server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client for an SRV-found destination is kept (its addresses were resolved once).
const SRV_CLIENT_TTL: Duration = Duration::from_secs(300);
/// Clients for SRV-found destinations kept at most.
const MAX_SRV_CLIENTS: usize = 256;
/// Largest answer read from another server.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

pub struct Federation {
    /// For discovered destinations: reaches only public addresses (and the operator's
    /// `federation_ip_range_allowlist`), checked at every resolution.
    guarded: reqwest::Client,
    /// For destinations the operator pinned in `federation_destinations`: used as given.
    pinned: reqwest::Client,
    allow: Arc<Vec<ipnet::IpNet>>,
    /// The operator's extra CA roots (`federation_ca_file`), for clients built later.
    extra_roots: Vec<reqwest::Certificate>,
    /// Clients for destinations found through DNS SRV: each connects to the record's target
    /// (addresses checked by the guard) while TLS and `Host:` name the server. Keyed by
    /// (server host, target), kept [`SRV_CLIENT_TTL`] so address changes are picked up.
    srv_clients: Mutex<HashMap<(String, String), (reqwest::Client, Instant)>>,
    pub(crate) globals: Arc<Globals>,
    pub(crate) storage: Storage,
    pub destinations: destination::Destinations,
    /// Who may be talked to (the policy layer decides; built from the same config).
    pub(crate) policy: crate::policy::Policy,
    /// The outgoing queue (see `sender.rs`).
    pub sender: sender::Sender,
    /// Notaries asked for a server's keys when the server itself cannot be reached
    /// (`trusted_servers`).
    pub(crate) trusted_servers: Vec<ruma::OwnedServerName>,
    /// Incoming `/send` transactions in flight, by (origin, transaction id): a retry waits for
    /// the first attempt and then gets its answer; at most [`TXNS_IN_FLIGHT_PER_ORIGIN`] per
    /// origin (see `service::inflight`).
    /// The bounds on fetching other servers' media.
    pub(crate) media_fetches: media::RemoteFetches,
    pub(crate) txns_in_flight: InFlight<(ruma::OwnedServerName, String), ruma::OwnedServerName>,
    /// The register of destinations contacted (every request goes through [`Self::route_to`]).
    pub(crate) register: Option<Arc<crate::policy::register::Register>>,
}

impl Federation {
    pub fn new(
        config: &Config,
        storage: Storage,
        globals: Arc<Globals>,
        wake: Arc<sender::Wake>,
    ) -> Result<Federation> {
        let extra_roots = match &config.federation_ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::internal(format!("federation_ca_file {}: {e}", path.display()))
                })?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| Error::internal(format!("federation_ca_file: {e}")))?
            }
            None => Vec::new(),
        };
        let allow = Arc::new(parse_ranges(&config.federation_ip_range_allowlist));
        let guarded = client_builder(&extra_roots)
            .dns_resolver(Arc::new(GuardedResolver::new(allow.clone())))
            .build()
            .map_err(|e| Error::internal(format!("federation client: {e}")))?;
        let pinned = client_builder(&extra_roots)
            .build()
            .map_err(|e| Error::internal(format!("federation client: {e}")))?;
        Ok(Federation {
            destinations: destination::Destinations::new(config, guarded.clone()),
            pinned,
            guarded,
            sender: sender::Sender::new(storage.clone(), wake)?,
            txns_in_flight: InFlight::new(TXNS_IN_FLIGHT_PER_ORIGIN),
            media_fetches: media::RemoteFetches::default(),
            allow,
            extra_roots,
            srv_clients: Mutex::new(HashMap::new()),
            trusted_servers: config.trusted_servers.clone(),
            globals,
            storage,
            policy: crate::policy::Policy::new(config),
            register: None,
        })
    }

    /// Count every destination contacted in `register`.
    pub fn with_register(mut self, register: Arc<crate::policy::register::Register>) -> Self {
        self.register = Some(register);
        self
    }

    /// The client and base URL for `server`, if the policy lets us talk to it. Discovered
    /// addresses must be public (or allowed): a server name cannot point requests into the
    /// server's own network.
    pub(crate) async fn route_to(&self, server: &ServerName) -> Result<Route> {
        self.policy.may_federate_with(server)?;
        if let Some(register) = &self.register {
            register.contact(crate::policy::register::FEDERATION, server.as_str());
        }
        let dest = self.destinations.base_url(server).await?;
        if dest.pinned {
            return Ok(Route {
                client: self.pinned.clone(),
                base: dest.url,
                host: None,
            });
        }
        if !url_allowed(&dest.url, &self.allow) {
            return Err(unreachable(server, "its address is not a public one"));
        }
        let client = match &dest.connect_to {
            Some(target) => self.srv_client(server, &dest.url, target).await?,
            None => self.guarded.clone(),
        };
        Ok(Route {
            client,
            base: dest.url,
            host: dest.host_header,
        })
    }

    /// A client that reaches the host of `url` at the addresses of `target` (an SRV record's
    /// target), each passed through the address guard; TLS still checks the certificate for
    /// the URL's host.
    async fn srv_client(
        &self,
        server: &ServerName,
        url: &str,
        target: &str,
    ) -> Result<reqwest::Client> {
        let host = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .ok_or_else(|| unreachable(server, "no host in its address"))?;
        let key = (host.clone(), target.to_owned());
        if let Some((client, until)) = self.srv_clients.lock().get(&key) {
            if *until > Instant::now() {
                return Ok(client.clone());
            }
        }
        let addrs: Vec<std::net::SocketAddr> =
            tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::lookup_host((target, 0)))
                .await
                .map_err(|_| unreachable(server, "resolving its SRV target timed out"))?
                .map_err(|e| unreachable(server, e))?
                .filter(|a| may_connect(a.ip(), &self.allow))
                .take(16)
                .collect();
        if addrs.is_empty() {
            return Err(unreachable(
                server,
                "its SRV target resolves to no address that may be reached",
            ));
        }
        let client = client_builder(&self.extra_roots)
            .dns_resolver(Arc::new(GuardedResolver::new(self.allow.clone())))
            .resolve_to_addrs(&host, &addrs)
            .build()
            .map_err(|e| Error::internal(format!("federation client: {e}")))?;
        let mut clients = self.srv_clients.lock();
        if clients.len() >= MAX_SRV_CLIENTS {
            clients.clear();
        }
        clients.insert(key, (client.clone(), Instant::now() + SRV_CLIENT_TTL));
        Ok(client)
    }

    /// A request to another server, signed with `X-Matrix`; the answer's JSON on success.
    /// Errors of the remote server come back as `M_UNKNOWN` 502 with their errcode in the text.
    pub async fn send(
        &self,
        method: http::Method,
        destination: &ServerName,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        self.send_limited(
            method,
            destination,
            path_and_query,
            body,
            MAX_RESPONSE_BYTES,
        )
        .await
    }

    /// [`Federation::send`], reading an answer of up to `limit` bytes (a room's whole state in
    /// `send_join` is larger than other answers).
    pub async fn send_limited(
        &self,
        method: http::Method,
        destination: &ServerName,
        path_and_query: &str,
        body: Option<Value>,
        limit: usize,
    ) -> Result<Value> {
        let route = self.route_to(destination).await?;
        let authorization = auth::authorization_header(
            &self.globals,
            &method,
            destination,
            path_and_query,
            body.as_ref(),
        )?;
        let mut request = route
            .request(method, path_and_query)
            .header(http::header::AUTHORIZATION, authorization);
        if let Some(b) = &body {
            request = request.json(b);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(destination, e))?;
        let status = response.status();
        let answer = read_json_limited(response, limit).await?;
        if !status.is_success() {
            return Err(remote_error(destination, status, &answer));
        }
        Ok(answer)
    }
}

impl Federation {
    /// A `GET` whose answer is not JSON (federation media): its headers and its body as a
    /// stream, read by the caller as it arrives (into a file, under its own size limit).
    pub async fn get_streamed(
        &self,
        destination: &ServerName,
        path_and_query: &str,
    ) -> Result<(http::HeaderMap, BodyStream)> {
        let route = self.route_to(destination).await?;
        let authorization = auth::authorization_header(
            &self.globals,
            &http::Method::GET,
            destination,
            path_and_query,
            None,
        )?;
        let response = route
            .request(http::Method::GET, path_and_query)
            .header(http::header::AUTHORIZATION, authorization)
            .send()
            .await
            .map_err(|e| unreachable(destination, e))?;
        let status = response.status();
        if !status.is_success() {
            let answer = read_json(response).await.unwrap_or(Value::Null);
            return Err(remote_error(destination, status, &answer));
        }
        let headers = response.headers().clone();
        Ok((headers, body_stream(response)))
    }

    /// A plain `GET` of a URL another server named (a media `Location`), through the address
    /// guard; the body as a stream.
    pub async fn get_url_streamed(&self, url: &str) -> Result<(http::HeaderMap, BodyStream)> {
        if !url_allowed(url, &self.allow) {
            return Err(Error::not_found(
                "The media location is not a public address",
            ));
        }
        let response = self.guarded.get(url).send().await.map_err(|e| {
            Error::with_status(
                ErrCode::Unknown,
                http::StatusCode::BAD_GATEWAY,
                e.to_string(),
            )
        })?;
        if !response.status().is_success() {
            return Err(Error::not_found(
                "The media location answered with an error",
            ));
        }
        let headers = response.headers().clone();
        Ok((headers, body_stream(response)))
    }
}

/// The body of another server's answer, chunk by chunk as it arrives.
pub type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes>> + Send>>;

fn body_stream(response: reqwest::Response) -> BodyStream {
    use futures_util::StreamExt;
    Box::pin(response.bytes_stream().map(|chunk| {
        chunk.map_err(|e| {
            Error::with_status(
                ErrCode::Unknown,
                http::StatusCode::BAD_GATEWAY,
                e.to_string(),
            )
        })
    }))
}

/// At most `limit` bytes of an answer's body; `too_large` is the error when there are more.
async fn read_bytes_limited(
    mut response: reqwest::Response,
    limit: usize,
    too_large: impl Fn() -> Error,
) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            e.to_string(),
        )
    })? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Check that every server of `keys` signed `object`, with a key `keys` lists for it. ruma's
/// `verify_json` alone checks the signatures the object carries, each against `keys`: an object
/// that carries none of a server's (or `"signatures": {}`) passes it as if signed.
pub fn verify_signed_by_all(
    keys: &ruma::signatures::PublicKeyMap,
    object: &ruma::CanonicalJsonObject,
) -> std::result::Result<(), String> {
    use ruma::CanonicalJsonValue;
    let Some(CanonicalJsonValue::Object(signatures)) = object.get("signatures") else {
        return Err("no signatures".to_owned());
    };
    for server in keys.keys() {
        if !matches!(signatures.get(server), Some(CanonicalJsonValue::Object(s)) if !s.is_empty()) {
            return Err(format!("not signed by {server}"));
        }
    }
    ruma::signatures::verify_json(keys, object).map_err(|e| e.to_string())
}

/// A remote server's refusal as our error: the refusals a client should see as they are (the
/// room is unknown there, the user may not join, the version does not fit) keep their code and
/// status; anything else is 502.
fn remote_error(destination: &ServerName, status: http::StatusCode, answer: &Value) -> Error {
    let errcode = answer.get("errcode").and_then(Value::as_str).unwrap_or("");
    let message = answer
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .take(200)
        .collect::<String>();
    let passed = match errcode {
        "M_FORBIDDEN" => Some(ErrCode::Forbidden),
        "M_NOT_FOUND" => Some(ErrCode::NotFound),
        "M_INCOMPATIBLE_ROOM_VERSION" => Some(ErrCode::IncompatibleRoomVersion),
        "M_UNSUPPORTED_ROOM_VERSION" => Some(ErrCode::UnsupportedRoomVersion),
        "M_UNABLE_TO_AUTHORISE_JOIN" => Some(ErrCode::UnableToAuthoriseJoin),
        "M_UNABLE_TO_GRANT_JOIN" => Some(ErrCode::UnableToGrantJoin),
        "M_BAD_JSON" => Some(ErrCode::BadJson),
        _ => None,
    };
    match passed {
        Some(code) if status.is_client_error() => Error::with_status(
            code,
            status,
            format!("{destination} answered {errcode}: {message}"),
        ),
        _ => Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            format!("{destination} answered {status}: {errcode}"),
        ),
    }
}

/// How a request to one server is made: the client, the base URL and, for destinations found
/// through SRV, the `Host:` header.
pub(crate) struct Route {
    pub client: reqwest::Client,
    pub base: String,
    pub host: Option<String>,
}

impl Route {
    pub fn request(&self, method: http::Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let request = self
            .client
            .request(method, format!("{}{path_and_query}", self.base));
        match &self.host {
            Some(host) => request.header(http::header::HOST, host),
            None => request,
        }
    }
}

/// The federation client's settings, with the operator's extra CA roots.
fn client_builder(extra_roots: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tls_certs_merge(extra_roots.to_vec())
}

pub(crate) fn unreachable(destination: &ServerName, e: impl std::fmt::Display) -> Error {
    Error::with_status(
        ErrCode::Unknown,
        http::StatusCode::BAD_GATEWAY,
        format!("{destination} is unreachable: {e}"),
    )
}

/// Read at most [`MAX_RESPONSE_BYTES`] of an answer as JSON.
pub(crate) async fn read_json(response: reqwest::Response) -> Result<Value> {
    read_json_limited(response, MAX_RESPONSE_BYTES).await
}

pub(crate) async fn read_json_limited(response: reqwest::Response, limit: usize) -> Result<Value> {
    let body = read_bytes_limited(response, limit, || {
        Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            "The remote answer is too large",
        )
    })
    .await?;
    serde_json::from_slice(&body).map_err(|_| {
        Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            "The remote answer is not JSON",
        )
    })
}

#[cfg(test)]
mod signature_tests {
    use ruma::{
        signatures::{sign_json, Ed25519KeyPair, PublicKeyMap},
        CanonicalJsonObject,
    };

    use super::verify_signed_by_all;

    fn key(version: &str) -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_owned()).expect("a key")
    }

    fn keys_of(entries: &[(&str, &str, &Ed25519KeyPair)]) -> PublicKeyMap {
        let mut map = PublicKeyMap::new();
        for (server, id, k) in entries {
            map.entry((*server).to_owned()).or_default().insert(
                (*id).to_owned(),
                ruma::serde::Base64::new(k.public_key().to_vec()),
            );
        }
        map
    }

    /// Found by `keys::fuzz::fuzz_any_key_document`: a key document with `"signatures": {}`
    /// passed the self-signature check; an invite without the invitee's signature passed too.
    #[test]
    fn every_server_of_the_map_must_have_signed() {
        let (a, b) = (key("a"), key("b"));
        let mut object: CanonicalJsonObject =
            serde_json::from_value(serde_json::json!({ "x": 1, "signatures": {} })).expect("json");
        let both = keys_of(&[
            ("a.example", "ed25519:a", &a),
            ("b.example", "ed25519:b", &b),
        ]);
        let only_a = keys_of(&[("a.example", "ed25519:a", &a)]);
        // Unsigned: ruma's verify_json alone lets it through.
        assert!(ruma::signatures::verify_json(&both, &object).is_ok());
        assert!(verify_signed_by_all(&both, &object).is_err());
        sign_json("a.example", &a, &mut object).expect("signs");
        assert!(verify_signed_by_all(&only_a, &object).is_ok());
        assert_eq!(
            verify_signed_by_all(&both, &object),
            Err("not signed by b.example".to_owned())
        );
        sign_json("b.example", &b, &mut object).expect("signs");
        assert!(verify_signed_by_all(&both, &object).is_ok());
        object.insert(
            "x".into(),
            ruma::CanonicalJsonValue::String("changed".into()),
        );
        assert!(verify_signed_by_all(&both, &object).is_err());
    }
}
