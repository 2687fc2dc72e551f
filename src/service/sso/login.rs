//! `POST /login` with `m.login.token` (the end of an SSO login) and `org.matrix.login.jwt`.
//! Every outcome is audited: `login` with the method, `login_failed` with a reason.

use ruma::{OwnedDeviceId, UserId};
use serde_json::{json, Value};

use crate::{
    error::{ErrCode, Error, Result},
    service::{accounts::Session, ratelimit::Action, Services},
};

/// What the client asked for besides its credential.
pub struct DeviceRequest {
    pub device_id: Option<OwnedDeviceId>,
    pub display_name: Option<String>,
    pub with_refresh: bool,
    pub ip: Option<std::net::IpAddr>,
}

fn failed(services: &Services, user: Option<&str>, method: &str, reason: &str) {
    let mut e = services.audit.entry("login_failed", user, None);
    e.detail = json!({ "reason": reason, "method": method });
    services.audit.note(e);
}

/// Log `user` in (after the credential was checked).
fn finish(services: &Services, user: &UserId, method: &str, d: DeviceRequest) -> Result<Session> {
    let accounts = &services.accounts;
    if accounts.user(user)?.is_some_and(|u| u.deactivated) {
        failed(services, Some(user.as_str()), method, "deactivated");
        return Err(Error::new(
            ErrCode::UserDeactivated,
            "This account has been deactivated",
        ));
    }
    crate::policy::access::check_device_limit(services, user, d.device_id.as_deref())?;
    let session = accounts.create_session(user, d.device_id, d.display_name, d.with_refresh)?;
    accounts.touch_device(user, &session.device_id, d.ip)?;
    let mut e = services.audit.entry(
        "login",
        Some(user.as_str()),
        Some(session.device_id.as_str()),
    );
    e.detail = json!({ "method": method });
    services.audit.note(e);
    Ok(session)
}

/// `m.login.token`: exchange a one-time login token.
pub fn token_login(services: &Services, token: &str, d: DeviceRequest) -> Result<Session> {
    if let Some(ip) = d.ip {
        services.ratelimit.check_ip(Action::Login, ip)?;
    }
    let rec = {
        let _once = services.sso.token_lock.lock();
        super::login_token::consume(&services.storage, token)?
    };
    let Some(rec) = rec else {
        failed(services, None, "token", "invalid_login_token");
        return Err(Error::forbidden("Invalid or expired login token"));
    };
    finish(services, &rec.user_id, &rec.method, d)
}

/// `org.matrix.login.jwt`: check the token, find (or register) the user.
pub async fn jwt_login(
    services: &Services,
    token: Option<&str>,
    d: DeviceRequest,
) -> Result<Session> {
    let Some(verifier) = services.sso.jwt.as_ref() else {
        return Err(Error::with_status(
            ErrCode::Unknown,
            http::StatusCode::BAD_REQUEST,
            "Unsupported login type",
        ));
    };
    if let Some(ip) = d.ip {
        services.ratelimit.check_ip(Action::Login, ip)?;
    }
    let Some(token) = token else {
        failed(services, None, "jwt", "missing_token");
        return Err(Error::forbidden("Token field for JWT is missing"));
    };
    let claims = match verifier.verify(token) {
        Ok(c) => c,
        Err(why) => {
            failed(services, None, "jwt", "invalid_jwt");
            return Err(Error::forbidden(format!("JWT validation failed: {why}")));
        }
    };
    let subject = claims
        .get(&verifier.subject_claim)
        .and_then(Value::as_str)
        .unwrap_or_default();
    let accounts = &services.accounts;
    let Ok(user) = accounts.local_user_id(subject) else {
        failed(services, None, "jwt", "invalid_user_id");
        return Err(Error::forbidden("Invalid JWT subject"));
    };
    // A bridge's users (its namespace, exclusive or not) are the bridge's to log in.
    if services.appservices.owner_of_user(&user).is_some() {
        failed(services, Some(user.as_str()), "jwt", "reserved");
        return Err(Error::forbidden(
            "This user belongs to a bridge on this server",
        ));
    }
    if !accounts.exists(&user)? {
        if !verifier.register_unknown_users {
            failed(services, Some(user.as_str()), "jwt", "unknown_user");
            return Err(Error::forbidden("There is no account for this user"));
        }
        if accounts.validate_new_localpart(user.localpart()).is_err() {
            failed(services, Some(user.as_str()), "jwt", "invalid_user_id");
            return Err(Error::forbidden("Invalid JWT subject"));
        }
        // No password: the account logs in through the identity service.
        accounts.create_user(&user, None, false, false)?;
        crate::service::profile_defaults(services, &user)?;
    }
    let groups = crate::policy::claims::groups_from_claim(
        verifier.groups_claim.as_deref().and_then(|c| claims.get(c)),
    );
    crate::policy::claims::record_login(services, &user, "jwt", groups).await?;
    finish(services, &user, "jwt", d)
}
