//! Federation: reaching other homeservers and proving who we are to them, and checking who
//! they are (groundwork for issue 5).
//!
//! - `destination`: where a server name is reached (configured map, IP literals and ports,
//!   `/.well-known/matrix/server` delegation, port 8448).
//! - `keys`: other servers' signing keys, fetched from them, self-signature checked, cached
//!   until their `valid_until_ts`.
//! - `auth`: the `X-Matrix` request signature, made for outgoing requests and checked on
//!   incoming ones.

pub mod auth;
pub mod destination;
pub mod keys;

use std::{sync::Arc, time::Duration};

use ruma::ServerName;
use serde_json::Value;

use crate::{
    config::Config,
    error::{ErrCode, Error, Result},
    service::globals::Globals,
    storage::Storage,
};

/// Timeout of one request to another server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest answer read from another server.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

pub struct Federation {
    pub(crate) client: reqwest::Client,
    pub(crate) globals: Arc<Globals>,
    pub(crate) storage: Storage,
    pub destinations: destination::Destinations,
    pub(crate) keys_lock: tokio::sync::Mutex<()>,
    /// Who may be talked to (the policy layer decides; built from the same config).
    pub(crate) policy: crate::policy::Policy,
}

impl Federation {
    pub fn new(config: &Config, storage: Storage, globals: Arc<Globals>) -> Result<Federation> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(path) = &config.federation_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::internal(format!("federation_ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::internal(format!("federation_ca_file: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| Error::internal(format!("federation client: {e}")))?;
        Ok(Federation {
            destinations: destination::Destinations::new(config, client.clone()),
            client,
            globals,
            storage,
            keys_lock: tokio::sync::Mutex::new(()),
            policy: crate::policy::Policy::new(config),
        })
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
        self.policy.may_federate_with(destination)?;
        let base = self.destinations.base_url(destination).await?;
        let authorization = auth::authorization_header(
            &self.globals,
            &method,
            destination,
            path_and_query,
            body.as_ref(),
        )?;
        let mut request = self
            .client
            .request(method, format!("{base}{path_and_query}"))
            .header(http::header::AUTHORIZATION, authorization);
        if let Some(b) = &body {
            request = request.json(b);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(destination, e))?;
        let status = response.status();
        let answer = read_json(response).await?;
        if !status.is_success() {
            return Err(Error::with_status(
                ErrCode::Unknown,
                http::StatusCode::BAD_GATEWAY,
                format!(
                    "{destination} answered {status}: {}",
                    answer.get("errcode").and_then(Value::as_str).unwrap_or("")
                ),
            ));
        }
        Ok(answer)
    }
}

pub(crate) fn unreachable(destination: &ServerName, e: impl std::fmt::Display) -> Error {
    Error::with_status(
        ErrCode::Unknown,
        http::StatusCode::BAD_GATEWAY,
        format!("{destination} is unreachable: {e}"),
    )
}

/// Read at most [`MAX_RESPONSE_BYTES`] of an answer as JSON.
pub(crate) async fn read_json(mut response: reqwest::Response) -> Result<Value> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            e.to_string(),
        )
    })? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(Error::with_status(
                ErrCode::Unknown,
                http::StatusCode::BAD_GATEWAY,
                "The remote answer is too large",
            ));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| {
        Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_GATEWAY,
            "The remote answer is not JSON",
        )
    })
}
