//! The external policy hook: an HTTP service of the organization asked before invite, join,
//! createRoom and sending messages. It gets a JSON description of the action (never message
//! content) and answers `{"allow": bool, "reason": "..."}`. An answer that does not come in time,
//! or is no such object, counts as `fail_open` says (default: deny).
//!
//! The URL is the operator's own (usually internal) service, so the request does not go through
//! the address guard that protects requests users or other servers can steer; it is bounded in
//! time and in the size of the answer, and follows no redirects.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Largest answer read from the policy service.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyHookConfig {
    /// Where decisions are asked (`POST`), e.g. `"http://127.0.0.1:9000/decide"`.
    pub url: String,
    /// How long to wait for an answer, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Allow the action when the service does not answer (or answers nonsense). Off: deny.
    #[serde(default)]
    pub fail_open: bool,
}

fn default_timeout_ms() -> u64 {
    1000
}

impl Default for PolicyHookConfig {
    fn default() -> Self {
        PolicyHookConfig {
            url: String::new(),
            timeout_ms: default_timeout_ms(),
            fail_open: false,
        }
    }
}

pub fn validate(c: &PolicyHookConfig) -> std::result::Result<(), String> {
    let ok = reqwest::Url::parse(&c.url)
        .ok()
        .is_some_and(|u| matches!(u.scheme(), "http" | "https"));
    if !ok {
        return Err(format!(
            "policy_hook.url: `{}` is not an http(s) URL",
            c.url
        ));
    }
    if c.timeout_ms == 0 || c.timeout_ms > 60_000 {
        return Err("policy_hook.timeout_ms: must be between 1 and 60000".into());
    }
    Ok(())
}

/// The hook's decision.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason to tell the user.
    Deny(String),
}

pub struct PolicyHook {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    fail_open: bool,
}

impl PolicyHook {
    pub fn new(c: &PolicyHookConfig) -> Result<PolicyHook> {
        let timeout = Duration::from_millis(c.timeout_ms);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
            .map_err(|e| Error::internal(format!("policy hook client: {e}")))?;
        Ok(PolicyHook {
            client,
            url: c.url.clone(),
            timeout,
            fail_open: c.fail_open,
        })
    }

    /// Ask about `action` (a JSON object describing it).
    pub async fn ask(&self, action: &Value) -> Decision {
        let answer = tokio::time::timeout(self.timeout, self.call(action)).await;
        match answer {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => self.failed(&e),
            Err(_) => self.failed("no answer in time"),
        }
    }

    fn failed(&self, why: &str) -> Decision {
        tracing::warn!(url = %self.url, "policy hook failed: {why}");
        if self.fail_open {
            Decision::Allow
        } else {
            Decision::Deny(format!(
                "the organization's policy service could not be asked ({why})"
            ))
        }
    }

    async fn call(&self, action: &Value) -> std::result::Result<Decision, String> {
        let res = self
            .client
            .post(&self.url)
            .json(action)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("it answered {}", res.status()));
        }
        let body = crate::utils::read_answer(res, MAX_ANSWER).await?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|_| "the answer is not JSON".to_owned())?;
        match v.get("allow").and_then(Value::as_bool) {
            Some(true) => Ok(Decision::Allow),
            Some(false) => Ok(Decision::Deny(
                v.get("reason")
                    .and_then(Value::as_str)
                    .map(|r| r.chars().take(500).collect())
                    .unwrap_or_else(|| "denied by the organization's policy service".to_owned()),
            )),
            None => Err("the answer has no boolean `allow`".into()),
        }
    }
}
