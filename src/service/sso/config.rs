//! The SSO and JWT login settings (`[[global.oidc_providers]]`, `[global.jwt]`) and their checks.
//! Names follow Synapse's `oidc_providers` and `jwt_config` where they exist.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// One OpenID Connect identity provider.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcProvider {
    /// The id clients use in `/login/sso/redirect/{idpId}` (1-64 of a-z, 0-9, `-`, `_`, `.`).
    pub idp_id: String,
    /// The name clients show on the login button.
    pub idp_name: String,
    /// An `mxc://` icon for the button.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_icon: Option<String>,
    /// A brand hint for clients (`keycloak`, `microsoft`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_brand: Option<String>,
    /// The issuer URL; discovery reads `{issuer}/.well-known/openid-configuration`, whose
    /// `issuer` must be this exact string.
    pub issuer: String,
    pub client_id: String,
    /// The client secret, or `client_secret_file` naming a file that holds it (first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// How the secret is sent to the token endpoint: `client_secret_basic` (default),
    /// `client_secret_post`, or `none` (a public client, PKCE only).
    #[serde(default = "default_auth_method")]
    pub client_auth_method: String,
    /// Scopes asked for; `openid` is always added.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim new users' localpart is made from (lowercased, other characters than
    /// a-z 0-9 . _ = - / + replaced by `_`).
    #[serde(default = "default_localpart_claim")]
    pub localpart_claim: String,
    /// The claim new users' display name is taken from.
    #[serde(default = "default_displayname_claim")]
    pub displayname_claim: String,
    /// The claim listing the user's groups (closed user groups' `sso_groups`). Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// A first login whose localpart names an existing account logs into that account
    /// (otherwise a free localpart with a number appended is taken).
    #[serde(default)]
    pub allow_existing_users: bool,
    /// Unknown users get an account at their first login; false: only users already linked
    /// (or existing ones with `allow_existing_users`) may log in.
    #[serde(default = "crate::config::default_true")]
    pub auto_provision: bool,
}

/// JWT login (`org.matrix.login.jwt`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The shared secret of the HMAC algorithms (`HS256`, `HS384`, `HS512`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A PEM file with the public key (RSA or EC) of the other algorithms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The signature algorithm tokens must use (`HS256`, `RS256`, `ES256`, ...).
    #[serde(default = "default_jwt_algorithm")]
    pub algorithm: String,
    /// When set, the `iss` claim must be this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When not empty, the `aud` claim must name one of these.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The claim holding the localpart (or full user id) of the user.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The claim listing the user's groups. Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_claim: Option<String>,
    /// Unknown users get an account (as Synapse does); false: they are refused.
    #[serde(default = "crate::config::default_true")]
    pub register_unknown_users: bool,
}

impl JwtConfig {
    /// Every optional key set, so that the config's key list names them.
    pub fn for_keys() -> JwtConfig {
        JwtConfig {
            secret: Some(String::new()),
            key_file: Some(PathBuf::new()),
            algorithm: default_jwt_algorithm(),
            issuer: Some(String::new()),
            audiences: Vec::new(),
            subject_claim: default_subject_claim(),
            groups_claim: Some(String::new()),
            register_unknown_users: true,
        }
    }
}

fn default_auth_method() -> String {
    "client_secret_basic".to_owned()
}
fn default_scopes() -> Vec<String> {
    vec!["openid".to_owned(), "profile".to_owned()]
}
fn default_localpart_claim() -> String {
    "preferred_username".to_owned()
}
fn default_displayname_claim() -> String {
    "name".to_owned()
}
fn default_jwt_algorithm() -> String {
    "HS256".to_owned()
}
fn default_subject_claim() -> String {
    "sub".to_owned()
}

/// Check the SSO and JWT settings at load.
pub fn validate(c: &Config) -> Result<(), String> {
    let mut ids = std::collections::BTreeSet::new();
    for p in &c.oidc_providers {
        let ok_id = !p.idp_id.is_empty()
            && p.idp_id.len() <= 64
            && p.idp_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !ok_id {
            return Err(format!(
                "oidc_providers: idp_id `{}` must be 1-64 of a-z, 0-9, -, _, .",
                p.idp_id
            ));
        }
        if !ids.insert(p.idp_id.as_str()) {
            return Err(format!("oidc_providers: `{}` is defined twice", p.idp_id));
        }
        let web = |u: &str| u.starts_with("https://") || u.starts_with("http://");
        if !web(&p.issuer) {
            return Err(format!(
                "oidc_providers.{}: issuer must be an http(s) URL",
                p.idp_id
            ));
        }
        if p.client_id.is_empty() {
            return Err(format!("oidc_providers.{}: client_id is empty", p.idp_id));
        }
        match p.client_auth_method.as_str() {
            "client_secret_basic" | "client_secret_post" => {
                if p.client_secret.is_none() && p.client_secret_file.is_none() {
                    return Err(format!(
                        "oidc_providers.{}: needs client_secret or client_secret_file",
                        p.idp_id
                    ));
                }
            }
            "none" => {}
            other => {
                return Err(format!(
                    "oidc_providers.{}: client_auth_method `{other}` is not one of client_secret_basic, client_secret_post, none",
                    p.idp_id
                ))
            }
        }
        if let Some(icon) = &p.idp_icon {
            if !icon.starts_with("mxc://") {
                return Err(format!(
                    "oidc_providers.{}: idp_icon must be an mxc:// URI",
                    p.idp_id
                ));
            }
        }
        if public_base(c).is_none() {
            return Err(
                "oidc_providers: SSO needs public_baseurl (or well_known.client) for the callback URL"
                    .into(),
            );
        }
    }
    for prefix in &c.sso_client_allowlist {
        // A scheme and more; never one that runs code or reads files in the browser.
        let scheme = prefix.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        let ok = prefix.len() > 4
            && scheme.as_deref().is_some_and(|s| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    && !matches!(s, "javascript" | "data" | "vbscript" | "file")
            });
        if !ok {
            return Err(format!(
                "sso_client_allowlist: `{prefix}` is not a URL prefix (like \"https://app.element.io/\")"
            ));
        }
    }
    if let Some(base) = &c.public_baseurl {
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err("public_baseurl: must be an http(s) URL".into());
        }
    }
    if let Some(j) = &c.jwt {
        crate::service::sso::jwt::check_config(j)?;
    }
    Ok(())
}

/// The public base URL without a trailing slash.
pub fn public_base(c: &Config) -> Option<String> {
    c.public_baseurl
        .as_deref()
        .or(c.well_known.client.as_deref())
        .filter(|b| !b.is_empty())
        .map(|b| b.trim_end_matches('/').to_owned())
}
