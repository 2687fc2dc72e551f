//! JWT login (`org.matrix.login.jwt`, Synapse's name): the client sends a token its
//! organization's identity service signed; we check the signature with the configured secret or
//! public key, `exp` (required) and `nbf`, and `iss` and `aud` when configured.

use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::config::JwtConfig;
use crate::error::{Error, Result};

/// Clock difference tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// The longest token looked at.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Check `[global.jwt]` at load (algorithm known, a key that fits it).
pub fn check_config(j: &JwtConfig) -> std::result::Result<(), String> {
    let alg = Algorithm::from_str(&j.algorithm)
        .map_err(|_| format!("jwt.algorithm: `{}` is not a JWT algorithm", j.algorithm))?;
    let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
    match (hmac, &j.secret, &j.key_file) {
        (true, Some(s), _) if !s.is_empty() => Ok(()),
        (true, _, _) => Err("jwt: an HS* algorithm needs a non-empty `secret`".into()),
        (false, _, Some(_)) => Ok(()),
        (false, _, None) => Err(format!(
            "jwt: {} needs `key_file` (a PEM public key)",
            j.algorithm
        )),
    }
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    pub subject_claim: String,
    pub groups_claim: Option<String>,
    pub register_unknown_users: bool,
}

impl JwtVerifier {
    pub fn new(j: &JwtConfig) -> Result<JwtVerifier> {
        check_config(j).map_err(Error::internal)?;
        let alg = Algorithm::from_str(&j.algorithm)
            .map_err(|_| Error::internal("jwt.algorithm is invalid"))?;
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                DecodingKey::from_secret(j.secret.as_deref().unwrap_or_default().as_bytes())
            }
            _ => {
                let path = j
                    .key_file
                    .as_ref()
                    .ok_or_else(|| Error::internal("jwt.key_file"))?;
                let pem = std::fs::read(path).map_err(|e| {
                    Error::internal(format!("jwt.key_file {}: {e}", path.display()))
                })?;
                let parsed = match alg {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                };
                parsed
                    .map_err(|e| Error::internal(format!("jwt.key_file {}: {e}", path.display())))?
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &j.issuer {
            validation.set_issuer(&[iss.as_str()]);
            required.push("iss");
        }
        if j.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&j.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Ok(JwtVerifier {
            key,
            validation,
            subject_claim: j.subject_claim.clone(),
            groups_claim: j.groups_claim.clone(),
            register_unknown_users: j.register_unknown_users,
        })
    }

    /// The token's claims if it is valid; otherwise why not (for the audit log and the client).
    pub fn verify(&self, token: &str) -> std::result::Result<Map<String, Value>, String> {
        if token.len() > MAX_TOKEN_LEN {
            return Err("token too long".into());
        }
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }
}
