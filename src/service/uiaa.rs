//! User-interactive authentication sessions (in memory: a session lives minutes, and a restart
//! only means the client starts the flow again).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::{error::Error, utils};

const SESSION_LIFETIME: Duration = Duration::from_secs(15 * 60);
const MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug, Default)]
pub struct UiaaSession {
    /// The session id the client sends back.
    pub id: String,
    pub completed: Vec<String>,
    /// Data a stage remembers for the request that finishes the flow (e.g. the registration token).
    pub data: HashMap<String, String>,
    /// The user the session belongs to (for re-authentication of a logged-in user).
    pub user: Option<String>,
}

#[derive(Default)]
pub struct Uiaa {
    sessions: Mutex<HashMap<String, (Instant, UiaaSession)>>,
}

impl Uiaa {
    pub fn create(&self, user: Option<String>) -> String {
        let id = utils::random_string(24);
        let mut s = self.sessions.lock();
        let now = Instant::now();
        s.retain(|_, (t, _)| now.duration_since(*t) < SESSION_LIFETIME);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            {
                s.remove(&oldest);
            }
        }
        s.insert(
            id.clone(),
            (
                now,
                UiaaSession {
                    id: id.clone(),
                    user,
                    ..Default::default()
                },
            ),
        );
        id
    }

    pub fn get(&self, id: &str) -> Option<UiaaSession> {
        let s = self.sessions.lock();
        s.get(id)
            .filter(|(t, _)| t.elapsed() < SESSION_LIFETIME)
            .map(|(_, v)| v.clone())
    }

    /// When session `id` expires (None: there is no such live session). Whatever a stage
    /// reserves for the session (a registration token's use) is held until then.
    pub fn deadline(&self, id: &str) -> Option<Instant> {
        let s = self.sessions.lock();
        s.get(id)
            .map(|(t, _)| *t + SESSION_LIFETIME)
            .filter(|d| *d > Instant::now())
    }

    pub fn update(&self, id: &str, session: UiaaSession) {
        if let Some(entry) = self.sessions.lock().get_mut(id) {
            entry.1 = session;
        }
    }

    pub fn remove(&self, id: &str) {
        self.sessions.lock().remove(id);
    }

    /// The 401 answer that lists the flows, what is done, and optionally an error for the last try.
    pub fn challenge(
        &self,
        session: &str,
        flows: &[Vec<&str>],
        params: Value,
        error: Option<(&str, &str)>,
    ) -> Error {
        let completed = self.get(session).map(|s| s.completed).unwrap_or_default();
        let mut body = json!({
            "flows": flows.iter().map(|f| json!({ "stages": f })).collect::<Vec<_>>(),
            "params": params,
            "session": session,
            "completed": completed,
        });
        if let Some((code, message)) = error {
            body["errcode"] = json!(code);
            body["error"] = json!(message);
        }
        Error::Uiaa(body)
    }
}

/// What a flow stage checker says about the `auth` dict a client sent: called with the session
/// id, the stage and the dict.
pub type StageCheck<'a> = dyn FnMut(
        &str,
        &str,
        &serde_json::Map<String, Value>,
    ) -> crate::error::Result<Option<(String, String)>>
    + 'a;

impl Uiaa {
    /// Drive one user-interactive authentication step. `auth` is the client's `auth` dict (if
    /// any); `check` validates one stage and may return a (key, value) to remember. Returns the
    /// finished session once some flow is complete; otherwise the 401 challenge as the error.
    pub fn run(
        &self,
        flows: &[Vec<&str>],
        params: Value,
        auth: Option<&Value>,
        user: Option<&str>,
        check: &mut StageCheck<'_>,
    ) -> crate::error::Result<UiaaSession> {
        let Some(auth) = auth.and_then(Value::as_object) else {
            let session = self.create(user.map(str::to_owned));
            return Err(self.challenge(&session, flows, params, None));
        };
        // A missing or expired session starts a new one, so the client can simply retry.
        let (session_id, mut session) = match auth.get("session").and_then(Value::as_str) {
            Some(id) => match self.get(id) {
                Some(s) => (id.to_owned(), s),
                None => {
                    let id = self.create(user.map(str::to_owned));
                    let s = self.get(&id).unwrap_or_default();
                    (id, s)
                }
            },
            None => {
                let id = self.create(user.map(str::to_owned));
                let s = self.get(&id).unwrap_or_default();
                (id, s)
            }
        };
        if session.user.as_deref() != user {
            return Err(Error::forbidden("This session belongs to another user"));
        }
        if let Some(stage) = auth.get("type").and_then(Value::as_str) {
            if !flows.iter().any(|f| f.contains(&stage)) {
                return Err(self.challenge(
                    &session_id,
                    flows,
                    params,
                    Some(("M_UNRECOGNIZED", "Unknown authentication stage")),
                ));
            }
            match check(&session_id, stage, auth) {
                Ok(data) => {
                    if !session.completed.iter().any(|c| c == stage) {
                        session.completed.push(stage.to_owned());
                    }
                    if let Some((k, v)) = data {
                        session.data.insert(k, v);
                    }
                    self.update(&session_id, session.clone());
                }
                Err(Error::Matrix { code, message, .. }) => {
                    return Err(self.challenge(
                        &session_id,
                        flows,
                        params,
                        Some((code.as_str(), message.as_str())),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let done = flows.iter().any(|f| {
            f.iter()
                .all(|stage| session.completed.iter().any(|c| c == stage))
        });
        if done {
            self.remove(&session_id);
            Ok(session)
        } else {
            Err(self.challenge(&session_id, flows, params, None))
        }
    }

    /// Mark `stage` done in session `id` of `user` (a stage completed out of band: the SSO
    /// fallback page). False when there is no such session of that user.
    pub fn complete_stage(&self, id: &str, user: &str, stage: &str) -> bool {
        let mut sessions = self.sessions.lock();
        let Some((t, s)) = sessions.get_mut(id) else {
            return false;
        };
        if t.elapsed() >= SESSION_LIFETIME || s.user.as_deref() != Some(user) {
            return false;
        }
        if !s.completed.iter().any(|c| c == stage) {
            s.completed.push(stage.to_owned());
        }
        true
    }

    /// Has session `id` completed `stage`?
    fn stage_done(&self, id: Option<&str>, stage: &str) -> bool {
        id.and_then(|id| self.get(id))
            .is_some_and(|s| s.completed.iter().any(|c| c == stage))
    }

    /// Re-authentication of a logged-in user, as password change, deactivation, device deletion
    /// and cross-signing key replacement require: their password (`m.login.password`), or, for
    /// users linked to an SSO provider, a fresh login there (`m.login.sso`, completed in a
    /// browser through `/auth/m.login.sso/fallback/web`).
    pub fn reauth(
        &self,
        services: &crate::service::Services,
        user: &ruma::UserId,
        auth: Option<&Value>,
    ) -> crate::error::Result<()> {
        let accounts = &services.accounts;
        let has_password = accounts
            .user(user)?
            .is_some_and(|u| u.password_hash.is_some());
        let sso = services.sso.reauth_provider(services, user).is_some();
        let mut flows = Vec::new();
        if has_password || !sso {
            flows.push(vec!["m.login.password"]);
        }
        if sso {
            flows.push(vec!["m.login.sso"]);
        }
        let mut check = |session: &str,
                         stage: &str,
                         auth: &serde_json::Map<String, Value>|
         -> crate::error::Result<Option<(String, String)>> {
            if stage == "m.login.sso" {
                // Only the fallback page completes it; naming it again afterwards is fine.
                return if self.stage_done(Some(session), stage) {
                    Ok(None)
                } else {
                    Err(Error::forbidden(
                        "Complete the SSO stage in a browser (auth fallback) first",
                    ))
                };
            }
            let named = auth
                .get("identifier")
                .and_then(|i| i.get("user"))
                .or_else(|| auth.get("user"))
                .and_then(Value::as_str);
            if let Some(name) = named {
                let id = accounts
                    .local_user_id(name)
                    .map_err(|_| Error::forbidden("Invalid username or password"))?;
                if id != user {
                    return Err(Error::forbidden("You can only authenticate as yourself"));
                }
            }
            let password = auth
                .get("password")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::bad_json("Missing password"))?;
            // Re-authentication is a password check like login: under the same per-address
            // and per-account failure limits (429, not another 401), or a stolen access token
            // would be a free password oracle.
            let ip = crate::policy::audit::RequestCtx::current().ip;
            if let Some(ip) = ip {
                services
                    .ratelimit
                    .check_ip(crate::service::ratelimit::Action::Login, ip)?;
            }
            let found =
                crate::service::accounts::verify_password_limited(services, user, password, ip)?;
            if found == (crate::service::accounts::PasswordCheck::Right { deactivated: false }) {
                Ok(None)
            } else {
                Err(Error::forbidden("Invalid password"))
            }
        };
        self.run(&flows, json!({}), auth, Some(user.as_str()), &mut check)
            .map(|_| ())
    }
}
