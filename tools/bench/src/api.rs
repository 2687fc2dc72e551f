//! A minimal Client-Server API client: just what the scenarios need, standard endpoints only.

use std::time::Duration;

use serde_json::{json, Value};

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

/// Status code (0 for a transport error) and JSON body.
pub type Reply = (u16, Value);

#[derive(Clone, Debug)]
pub struct User {
    pub token: String,
}

pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    pub fn new(base: &str) -> Api {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("HTTP client builds");
        Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                let bytes = res.bytes().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                )
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// GET returning status, body and the body's size in bytes.
    pub async fn get_sized(&self, path: &str, token: &str) -> (u16, Value, usize) {
        match self
            .http
            .get(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .send()
            .await
        {
            Ok(res) => {
                let status = res.status().as_u16();
                let bytes = res.bytes().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    bytes.len(),
                )
            }
            Err(_) => (0, Value::Null, 0),
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }
    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.call(reqwest::Method::PUT, path, Some(token), Some(body))
            .await
    }

    /// Register through user-interactive auth: the registration-token stage when a token is
    /// given, the dummy stage otherwise, as the server's flows ask.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        token: Option<&str>,
    ) -> Result<User, String> {
        let mut body = json!({ "username": username, "password": password, "initial_device_display_name": "bench" });
        for _ in 0..5 {
            let (status, reply) = self
                .call(
                    reqwest::Method::POST,
                    "/_matrix/client/v3/register",
                    None,
                    Some(&body),
                )
                .await;
            match status {
                200 => {
                    return Ok(User {
                        token: reply["access_token"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    })
                }
                401 => {
                    let session = reply["session"].as_str().unwrap_or_default().to_owned();
                    let done: Vec<String> = reply["completed"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    let stage = next_stage(&reply, &done, token.is_some()).ok_or_else(|| {
                        format!("no registration flow this tool can complete: {reply}")
                    })?;
                    let mut auth = json!({ "type": stage, "session": session });
                    if stage == "m.login.registration_token" {
                        auth["token"] = json!(token);
                    }
                    body["auth"] = auth;
                }
                _ => return Err(format!("register {username}: {status} {reply}")),
            }
        }
        Err(format!("register {username}: too many auth rounds"))
    }

    pub async fn login(&self, user: &str, password: &str) -> Result<User, String> {
        let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password });
        let (status, reply) = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/login",
                None,
                Some(&body),
            )
            .await;
        if status != 200 {
            return Err(format!("login {user}: {status} {reply}"));
        }
        Ok(User {
            token: reply["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The first stage not yet completed of a flow made only of stages this tool can do.
fn next_stage(reply: &Value, done: &[String], have_token: bool) -> Option<&'static str> {
    let can = |s: &str| s == "m.login.dummy" || (have_token && s == "m.login.registration_token");
    for flow in reply["flows"].as_array()? {
        let stages: Vec<&str> = flow["stages"]
            .as_array()?
            .iter()
            .filter_map(|s| s.as_str())
            .collect();
        if stages.iter().all(|s| can(s)) {
            for s in stages {
                if !done.iter().any(|d| d == s) {
                    return Some(if s == "m.login.dummy" {
                        "m.login.dummy"
                    } else {
                        "m.login.registration_token"
                    });
                }
            }
        }
    }
    None
}
