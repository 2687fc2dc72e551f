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

/// Property tests: any token is refused or accepted without panic, a token we sign with the
/// configured secret and a valid `exp` is accepted with its claims, and no change to its signed
/// part is.
#[cfg(test)]
mod fuzz {
    use jsonwebtoken::{EncodingKey, Header};
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{apply_edits, config, edit_text, edits, json, text, Edits};

    const SECRET: &str = "fuzzing secret";

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&JwtConfig {
            secret: Some(SECRET.to_owned()),
            key_file: None,
            algorithm: "HS256".to_owned(),
            issuer: None,
            audiences: Vec::new(),
            subject_claim: "sub".to_owned(),
            groups_claim: None,
            register_unknown_users: true,
        })
        .expect("a verifier")
    }

    fn now() -> i64 {
        i64::try_from(crate::utils::now_ms() / 1000).expect("a time")
    }

    /// Claims with any other content, and `exp`/`nbf` near now, far off, or not numbers.
    fn claims() -> impl Strategy<Value = (Map<String, Value>, i64)> {
        let exp = prop_oneof![
            (-10_000i64..10_000).prop_map(|d| Value::from(now() + d)),
            Just(Value::from(i64::MAX)),
            Just(Value::from(u64::MAX)),
            Just(Value::from(-1)),
            json(),
        ];
        (
            prop::collection::btree_map("[a-z]{1,4}", json(), 0..5),
            exp,
            prop::option::of(json()),
        )
            .prop_map(|(rest, exp, nbf)| {
                let mut m: Map<String, Value> = rest.into_iter().collect();
                m.insert("exp".into(), exp);
                match nbf {
                    Some(n) => m.insert("nbf".into(), n),
                    None => m.remove("nbf"),
                };
                (m, now())
            })
    }

    fn sign(alg: Algorithm, claims: &Map<String, Value>) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("signs")
    }

    /// Whether `exp` (and `nbf` when present) let the token be used at `now`; None when the
    /// test does not decide (not integers, or a few seconds from an edge while time passes).
    fn timely(claims: &Map<String, Value>, now: i64) -> Option<bool> {
        let (leeway, now) = (i128::from(LEEWAY_SECS), i128::from(now));
        let exp = i128::from(claims.get("exp")?.as_u64()?);
        let nbf = match claims.get("nbf") {
            None => None,
            Some(v) => Some(i128::from(v.as_u64()?)),
        };
        if (exp + leeway - now).abs() < 5 || nbf.is_some_and(|n| (n - leeway - now).abs() < 5) {
            return None;
        }
        Some(exp + leeway > now && nbf.is_none_or(|n| n - leeway <= now))
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_token_is_checked_without_panic(token in prop_oneof![
            text(),
            "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}",
            (1usize..20_000).prop_map(|n| format!("{}.e30.", "e".repeat(n))),
        ]) {
            let result = verifier().verify(&token);
            if token.len() > MAX_TOKEN_LEN {
                prop_assert!(result.is_err());
            }
        }

        #[test]
        fn fuzz_signed_tokens_and_their_changes(claims in claims(), edits in edits()) {
            let (claims, now) = claims;
            let v = verifier();
            let token = sign(Algorithm::HS256, &claims);
            let result = v.verify(&token);
            // The claims as any JSON reader reads them back (floats may move by an ulp).
            let read_back: Map<String, Value> =
                serde_json::from_str(&serde_json::to_string(&claims).expect("json")).expect("json");
            match timely(&claims, now) {
                _ if token.len() > MAX_TOKEN_LEN => prop_assert!(result.is_err()),
                Some(true) => prop_assert_eq!(result.as_ref(), Ok(&read_back)),
                Some(false) => prop_assert!(result.is_err()),
                None => {}
            }
            // Changed anywhere in its header or claims, it is refused; only a change in the
            // signature's base64 that decodes to the same bytes may pass.
            let changed = edit_text(&token, &edits);
            if changed != token && v.verify(&changed).is_ok() {
                let signed = |t: &str| t.rsplit_once('.').map(|(s, _)| s.to_owned());
                prop_assert_eq!(signed(&changed), signed(&token));
            }
            // Another algorithm than the configured one, or none, is refused.
            prop_assert!(v.verify(&sign(Algorithm::HS384, &claims)).is_err());
            let unsigned = format!("{}.", token.rsplit_once('.').map(|(s, _)| s).unwrap_or_default());
            prop_assert!(v.verify(&unsigned).is_err());
            let none = token.replacen(
                token.split('.').next().unwrap_or_default(),
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
                1,
            );
            prop_assert!(v.verify(&none).is_err());
        }

        #[test]
        fn fuzz_bytes_as_token(bytes in prop::collection::vec(any::<u8>(), 0..200), e in edits()) {
            let e: Edits = e;
            let _ = verifier().verify(&String::from_utf8_lossy(&apply_edits(bytes, &e)));
        }
    }
}
