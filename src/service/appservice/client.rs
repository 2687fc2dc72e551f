//! Requests to appservices: transactions, user and alias queries, ping, third-party lookups.
//! Every request carries `Authorization: Bearer <hs_token>` and is counted in the register of
//! destinations (A11). The URL is the operator's (from the registration), so it is not limited to
//! public addresses as push gateways are; bridges usually listen on localhost.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::Appservice;
use crate::{
    error::{Error, Result},
    policy::register::APPSERVICE,
    service::Services,
};

/// How long a transaction may take before it counts as failed (and is retried).
const TXN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a query, ping or third-party lookup may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from an appservice (queries and third-party lookups).
const MAX_ANSWER: usize = 1024 * 1024;

pub struct Client {
    http: reqwest::Client,
}

/// Why a ping failed (each has its own errcode in the spec).
#[derive(Debug)]
pub enum PingError {
    UrlNotSet,
    Timeout,
    Failed(String),
    BadStatus(u16, String),
}

impl Client {
    pub fn new() -> Result<Client> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::internal(format!("appservice client: {e}")))?;
        Ok(Client { http })
    }

    /// `{url}/_matrix/app/v1/{segments...}` with each segment percent-encoded; None without url.
    fn url(a: &Appservice, segments: &[&str]) -> Option<url::Url> {
        let base = a.registration.url.as_deref()?;
        let mut u = url::Url::parse(base).ok()?;
        {
            let mut path = u.path_segments_mut().ok()?;
            path.pop_if_empty();
            path.extend(["_matrix", "app", "v1"]);
            path.extend(segments);
        }
        Some(u)
    }

    fn request(
        &self,
        s: &Services,
        a: &Appservice,
        method: reqwest::Method,
        url: url::Url,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        if let Some(base) = &a.registration.url {
            s.register.contact(APPSERVICE, base);
        }
        self.http
            .request(method, url)
            .bearer_auth(&a.registration.hs_token)
            .timeout(timeout)
    }

    /// Push one transaction; Ok once the appservice answered 2xx.
    pub async fn put_transaction(
        &self,
        s: &Services,
        a: &Appservice,
        txn_id: &str,
        body: &Value,
    ) -> Result<(), String> {
        let url = Self::url(a, &["transactions", txn_id]).ok_or("no url")?;
        let res = self
            .request(s, a, reqwest::Method::PUT, url, TXN_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", res.status()))
        }
    }

    /// Ask the appservice whether `user` exists (`GET /users/{userId}`): true on 2xx.
    pub async fn query_user(&self, s: &Services, a: &Appservice, user: &str) -> bool {
        self.query(s, a, &["users", user]).await
    }

    /// Ask the appservice to create `alias` (`GET /rooms/{roomAlias}`): true on 2xx.
    pub async fn query_alias(&self, s: &Services, a: &Appservice, alias: &str) -> bool {
        self.query(s, a, &["rooms", alias]).await
    }

    async fn query(&self, s: &Services, a: &Appservice, segments: &[&str]) -> bool {
        let Some(url) = Self::url(a, segments) else {
            return false;
        };
        match self
            .request(s, a, reqwest::Method::GET, url, QUERY_TIMEOUT)
            .send()
            .await
        {
            Ok(res) => res.status().is_success(),
            Err(e) => {
                tracing::info!("appservice {}: query failed: {}", a.id(), describe(&e));
                false
            }
        }
    }

    /// `POST /ping` with the transaction id the client gave; the round trip on success.
    pub async fn ping(
        &self,
        s: &Services,
        a: &Appservice,
        transaction_id: Option<&str>,
    ) -> Result<Duration, PingError> {
        let url = Self::url(a, &["ping"]).ok_or(PingError::UrlNotSet)?;
        let mut body = serde_json::Map::new();
        if let Some(t) = transaction_id {
            body.insert("transaction_id".into(), Value::String(t.to_owned()));
        }
        let started = Instant::now();
        let res = self
            .request(s, a, reqwest::Method::POST, url, QUERY_TIMEOUT)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    PingError::Timeout
                } else {
                    PingError::Failed(describe(&e))
                }
            })?;
        let status = res.status();
        if status.is_success() {
            return Ok(started.elapsed());
        }
        let body = read_limited(res).await.unwrap_or_default();
        Err(PingError::BadStatus(
            status.as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }

    /// A third-party lookup (`GET /thirdparty/{segments}?{query}`); the answer when it is 2xx JSON.
    pub async fn thirdparty(
        &self,
        s: &Services,
        a: &Appservice,
        segments: &[&str],
        query: &[(String, String)],
    ) -> Option<Value> {
        let mut url = Self::url(a, &[&["thirdparty"], segments].concat())?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let res = self
            .request(s, a, reqwest::Method::GET, url, QUERY_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !res.status().is_success() {
            return None;
        }
        let body = read_limited(res).await?;
        serde_json::from_slice(&body).ok()
    }
}

/// The body, up to [`MAX_ANSWER`] bytes (None beyond, or when the connection fails).
async fn read_limited(res: reqwest::Response) -> Option<Vec<u8>> {
    crate::utils::read_answer(res, MAX_ANSWER).await.ok()
}

/// A connection error without the URL (it could carry a query string) or any token.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "bad answer".to_owned()
    } else {
        "request failed".to_owned()
    }
}
