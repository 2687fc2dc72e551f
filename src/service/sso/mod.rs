//! Logins through the organization's identity provider (A4, D1): OpenID Connect SSO
//! (`m.login.sso`, then `m.login.token`) and JWT login (`org.matrix.login.jwt`).
//!
//! The SSO flow: `/login/sso/redirect[/{idpId}]?redirectUrl=` makes a pending login (state,
//! nonce, PKCE verifier; in memory, 10 minutes, bound to an HttpOnly cookie) and sends the
//! browser to the provider; the provider sends it back to our callback with a code, which
//! `oidc` exchanges and whose ID token it checks; `mapping` finds or makes the account;
//! `login_token` issues the one-time token the client then exchanges at `POST /login`.

pub mod config;
pub mod jwt;
pub mod login;
pub mod login_token;
pub mod mapping;
pub mod oidc;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use http::StatusCode;
use parking_lot::Mutex;
use ruma::OwnedUserId;

use crate::{
    config::Config,
    error::{Error, Result},
    policy::register::Register,
    utils,
};

/// How long a started SSO login may take at the provider.
const PENDING_LIFETIME: Duration = Duration::from_secs(600);
/// Most SSO logins pending at once; beyond it the oldest are dropped.
const MAX_PENDING: usize = 10_000;
/// The cookie that binds a pending login to the browser that started it.
pub const COOKIE: &str = "hafen_sso_session";
/// The callback path on this server the provider redirects to.
pub const CALLBACK_PATH: &str = "/_hafen/client/v1/sso/callback";

/// What an SSO round trip is for.
#[derive(Clone, Debug)]
pub enum Purpose {
    /// A login; the client waits at this URL for the login token.
    Login { redirect_url: String },
    /// The `m.login.sso` stage of user-interactive authentication session `session` of `user`.
    Reauth { session: String, user: OwnedUserId },
}

/// An SSO login started and not yet come back.
struct Pending {
    idp: usize,
    state: String,
    nonce: String,
    verifier: String,
    purpose: Purpose,
    created: Instant,
}

/// A failure of the SSO flow, shown to the user as a small HTML page.
#[derive(Debug)]
pub struct SsoFailure {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// The audit entry's `reason`.
    pub reason: &'static str,
}

impl SsoFailure {
    fn new(
        status: StatusCode,
        errcode: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> SsoFailure {
        SsoFailure {
            status,
            errcode,
            message: message.into(),
            reason,
        }
    }
    /// The provider failed or answered something we cannot accept.
    pub fn idp(reason: &'static str, message: impl Into<String>) -> SsoFailure {
        Self::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", reason, message)
    }
    /// The browser's request does not belong to a login we started.
    pub fn bad_request(reason: &'static str, message: impl Into<String>) -> SsoFailure {
        Self::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", reason, message)
    }
    pub fn forbidden(reason: &'static str, message: impl Into<String>) -> SsoFailure {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", reason, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> SsoFailure {
        tracing::error!(error = %e, "SSO login failed on our side");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "internal",
            "Internal server error",
        )
    }
}

/// A configured provider with its secret read.
pub struct Provider {
    pub conf: config::OidcProvider,
    pub secret: Option<String>,
    /// Discovery document and keys, fetched on first use.
    pub meta: oidc::MetaCache,
}

/// What the callback achieved.
pub enum Completed {
    /// A login: where to send the browser, and whether to ask first (`confirm`: the client is
    /// not in `sso_client_allowlist`, the user decides before it gets the token).
    Login { location: String, confirm: bool },
    /// The `m.login.sso` stage is done; the fallback page tells the client.
    Reauth,
}

pub struct Sso {
    pub providers: Vec<Provider>,
    pub jwt: Option<jwt::JwtVerifier>,
    /// Where the provider sends the browser back (absolute).
    callback_url: Option<String>,
    client_allowlist: Vec<String>,
    /// The cookie gets `Secure` when the public URL is https.
    secure_cookie: bool,
    http: reqwest::Client,
    pending: Mutex<HashMap<String, Pending>>,
    /// Login tokens are used once: consuming is a read and a delete under this lock.
    pub(crate) token_lock: Mutex<()>,
    register: Arc<Register>,
}

impl Sso {
    pub fn new(config: &Config, register: Arc<Register>) -> Result<Sso> {
        let mut providers = Vec::new();
        for p in &config.oidc_providers {
            let secret = match (&p.client_secret, &p.client_secret_file) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| {
                            Error::internal(format!(
                                "oidc_providers.{}: cannot read client_secret_file {}: {e}",
                                p.idp_id,
                                f.display()
                            ))
                        })?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            };
            providers.push(Provider {
                conf: p.clone(),
                secret,
                meta: oidc::MetaCache::default(),
            });
        }
        let jwt = config.jwt.as_ref().map(jwt::JwtVerifier::new).transpose()?;
        let base = config::public_base(config);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(oidc::TIMEOUT)
            .build()
            .map_err(|e| Error::internal(format!("SSO HTTP client: {e}")))?;
        Ok(Sso {
            providers,
            jwt,
            secure_cookie: base.as_deref().is_some_and(|b| b.starts_with("https://")),
            callback_url: base.map(|b| format!("{b}{CALLBACK_PATH}")),
            client_allowlist: config.sso_client_allowlist.clone(),
            http,
            pending: Mutex::new(HashMap::new()),
            token_lock: Mutex::new(()),
            register,
        })
    }

    /// Is SSO configured?
    pub fn enabled(&self) -> bool {
        !self.providers.is_empty()
    }

    /// The provider with this id.
    pub fn provider(&self, idp_id: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.conf.idp_id == idp_id)
    }

    /// Is `url` a URL a client may be sent back to? http or https with a host, or a URL starting
    /// with an entry of `sso_client_allowlist` (which may name an app's own scheme, such as
    /// `"io.element.android:/"`).
    pub fn valid_redirect_url(&self, url: &str) -> bool {
        if url.len() > 2048 {
            return false;
        }
        let web = url::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        web || (url::Url::parse(url).is_ok() && self.allowlisted(url))
    }

    /// Is `url` covered by an entry of `sso_client_allowlist`? A web entry (http, https) must
    /// name the same scheme, host and port, and its path must begin the URL's path (so
    /// `https://app.example` does not cover `https://app.example.evil.test/` or
    /// `https://app.example@evil.test/`); an app's own scheme is matched as a prefix.
    fn allowlisted(&self, url: &str) -> bool {
        let Ok(target) = url::Url::parse(url) else {
            return false;
        };
        self.client_allowlist
            .iter()
            .any(|entry| match url::Url::parse(entry) {
                Ok(e) if matches!(e.scheme(), "http" | "https") => {
                    e.scheme() == target.scheme()
                        && e.host_str() == target.host_str()
                        && e.port_or_known_default() == target.port_or_known_default()
                        && target.username().is_empty()
                        && target.password().is_none()
                        && target.path().starts_with(e.path())
                }
                _ => url.starts_with(entry.as_str()),
            })
    }

    /// Start a login at provider `idp`: the provider's authorization URL and the cookie value.
    pub async fn start(&self, idp: usize, purpose: Purpose) -> Result<(String, String)> {
        let provider = &self.providers[idp];
        let callback = self
            .callback_url
            .as_deref()
            .ok_or_else(|| Error::internal("SSO without a public base URL"))?;
        let meta = provider
            .meta
            .get(&self.http, &provider.conf, &self.register)
            .await
            .map_err(|f| {
                tracing::warn!(idp = %provider.conf.idp_id, "SSO discovery failed: {}", f.message);
                Error::with_status(
                    crate::error::ErrCode::Unknown,
                    StatusCode::BAD_GATEWAY,
                    "The identity provider cannot be reached",
                )
            })?;
        let p = Pending {
            idp,
            state: utils::random_string(32),
            nonce: utils::random_string(32),
            verifier: utils::random_string(64),
            purpose,
            created: Instant::now(),
        };
        let location = oidc::authorization_url(
            &meta.authorization_endpoint,
            &provider.conf,
            callback,
            &p.state,
            &p.nonce,
            &p.verifier,
            matches!(p.purpose, Purpose::Reauth { .. }),
        )?;
        let session = utils::random_string(32);
        let mut pending = self.pending.lock();
        pending.retain(|_, p| p.created.elapsed() < PENDING_LIFETIME);
        if pending.len() >= MAX_PENDING {
            // Bounded memory: drop the oldest half rather than refuse everyone.
            let mut ages: Vec<(Instant, String)> = pending
                .iter()
                .map(|(k, p)| (p.created, k.clone()))
                .collect();
            ages.sort();
            for (_, k) in ages.into_iter().take(MAX_PENDING / 2) {
                pending.remove(&k);
            }
        }
        pending.insert(session.clone(), p);
        Ok((location, session))
    }

    /// The `Set-Cookie` value binding a pending login to the browser (or clearing it).
    pub fn cookie(&self, session: Option<&str>) -> String {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        match session {
            Some(s) => format!(
                "{COOKIE}={s}; Path={CALLBACK_PATH}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                PENDING_LIFETIME.as_secs()
            ),
            None => format!(
                "{COOKIE}=; Path={CALLBACK_PATH}; Max-Age=0; HttpOnly; SameSite=Lax{secure}"
            ),
        }
    }

    /// The callback: [`Sso::complete`], with a `login_failed` audit entry for a failure.
    pub async fn callback(
        &self,
        services: &crate::service::Services,
        session: Option<&str>,
        query: &HashMap<String, String>,
    ) -> std::result::Result<Completed, SsoFailure> {
        let mut idp = None;
        let out = self.complete(services, session, query, &mut idp).await;
        if let Err(f) = &out {
            let mut e = services.audit.entry("login_failed", None, None);
            let method = idp
                .map(|i| format!("sso:{i}"))
                .unwrap_or_else(|| "sso".to_owned());
            e.detail = serde_json::json!({ "reason": f.reason, "method": method });
            services.audit.note(e);
        }
        out
    }

    /// The provider sent the browser back: check it, exchange the code, check the ID token, find
    /// or make the account and issue a login token. `idp` is the provider's id once known (for
    /// the audit entry of a failure).
    pub async fn complete(
        &self,
        services: &crate::service::Services,
        session: Option<&str>,
        query: &HashMap<String, String>,
        idp_of_failure: &mut Option<String>,
    ) -> std::result::Result<Completed, SsoFailure> {
        let pending = session
            .and_then(|s| self.pending.lock().remove(s))
            .filter(|p| p.created.elapsed() < PENDING_LIFETIME)
            .ok_or_else(|| {
                SsoFailure::bad_request(
                    "unknown_session",
                    "This login was not started in this browser or has expired. Start again from your client.",
                )
            })?;
        let provider = &self.providers[pending.idp];
        *idp_of_failure = Some(provider.conf.idp_id.clone());
        if query.get("state") != Some(&pending.state) {
            return Err(SsoFailure::bad_request(
                "state_mismatch",
                "The login answer does not belong to this login (state mismatch). Start again from your client.",
            ));
        }
        if let Some(err) = query.get("error") {
            let desc = query
                .get("error_description")
                .map(|d| format!(": {}", d.chars().take(300).collect::<String>()))
                .unwrap_or_default();
            return Err(SsoFailure::idp(
                "idp_error",
                format!(
                    "The identity provider refused the login ({}{desc})",
                    err.chars().take(100).collect::<String>()
                ),
            ));
        }
        let code = query.get("code").ok_or_else(|| {
            SsoFailure::bad_request("missing_code", "The login answer has no code")
        })?;
        let callback = self
            .callback_url
            .as_deref()
            .ok_or_else(|| SsoFailure::internal("no callback URL"))?;
        let meta = provider
            .meta
            .get(&self.http, &provider.conf, &self.register)
            .await?;
        let id_token = oidc::exchange_code(
            &self.http,
            &meta,
            provider,
            code,
            callback,
            &pending.verifier,
            &self.register,
        )
        .await?;
        let claims = provider
            .meta
            .verify_id_token(&self.http, &provider.conf, &self.register, &id_token)
            .await?;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(pending.nonce.as_str()) {
            return Err(SsoFailure::idp(
                "nonce_mismatch",
                "The identity provider's ID token does not belong to this login (nonce mismatch)",
            ));
        }
        let (redirect_url, user) = match pending.purpose {
            Purpose::Reauth { session, user } => {
                // The stage proves the account's owner is at the browser: the provider's user
                // must be the one linked to this account.
                let subject = claims
                    .get("sub")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default();
                let linked = mapping::linked(services, &provider.conf.idp_id, subject)
                    .map_err(SsoFailure::internal)?;
                if linked.as_ref() != Some(&user) {
                    return Err(SsoFailure::forbidden(
                        "reauth_wrong_user",
                        "You signed in at the identity provider as someone else",
                    ));
                }
                if !services
                    .uiaa
                    .complete_stage(&session, user.as_str(), "m.login.sso")
                {
                    return Err(SsoFailure::bad_request(
                        "unknown_session",
                        "The authentication session has expired. Start again from your client.",
                    ));
                }
                return Ok(Completed::Reauth);
            }
            Purpose::Login { redirect_url } => (
                redirect_url,
                mapping::map_oidc_user(services, provider, &claims)?,
            ),
        };
        let method = format!("sso:{}", provider.conf.idp_id);
        let groups = crate::policy::claims::groups_from_claim(
            provider
                .conf
                .groups_claim
                .as_deref()
                .and_then(|c| claims.get(c)),
        );
        crate::policy::claims::record_login(services, &user, &method, groups)
            .await
            .map_err(SsoFailure::internal)?;
        let token =
            login_token::issue(&services.storage, &user, &method).map_err(SsoFailure::internal)?;
        let mut url = url::Url::parse(&redirect_url)
            .map_err(|_| SsoFailure::bad_request("bad_redirect_url", "Invalid redirectUrl"))?;
        url.query_pairs_mut().append_pair("loginToken", &token);
        let confirm = !self.allowlisted(&redirect_url);
        Ok(Completed::Login {
            location: url.to_string(),
            confirm,
        })
    }

    /// The provider `user` re-authenticates with (`m.login.sso`): the first configured one they
    /// are linked to.
    pub fn reauth_provider(
        &self,
        services: &crate::service::Services,
        user: &ruma::UserId,
    ) -> Option<usize> {
        if !self.enabled() {
            return None;
        }
        mapping::linked_idps(services, user)
            .ok()?
            .iter()
            .find_map(|idp| self.provider(idp))
    }
}

/// Escape text for HTML (the pages of the SSO flow).
pub fn html_escape(s: &str) -> String {
    crate::policy::transparency::escape(s)
}
