//! Other servers' signing keys: fetched from the server itself, accepted only if the document
//! is signed by the keys it lists for the server it names, and cached (table
//! `remote_server_keys`) until its `valid_until_ts`.

use std::collections::BTreeMap;

use ruma::{serde::Base64, signatures::PublicKeyMap, CanonicalJsonObject, ServerName};
use serde_json::{json, Value};

use super::{read_json, unreachable, Federation};
use crate::{
    error::{ErrCode, Error, Result},
    service::globals::SigningKey,
    storage::Table,
    utils,
};

/// Longest a fetched key document is trusted, whatever `valid_until_ts` it claims (the spec's
/// seven days).
const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

fn bad_keys(server: &ServerName, why: &str) -> Error {
    Error::with_status(
        ErrCode::Unauthorized,
        http::StatusCode::UNAUTHORIZED,
        format!("Keys of {server}: {why}"),
    )
}

/// The `verify_keys` of a key document as key id -> unpadded base64 public key.
fn verify_keys(doc: &Value) -> BTreeMap<String, String> {
    doc.get("verify_keys")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(id, k)| Some((id.clone(), k.get("key")?.as_str()?.to_owned())))
        .collect()
}

impl Federation {
    /// The keys `server` signs requests with now (key id -> unpadded base64 public key).
    pub async fn current_keys(&self, server: &ServerName) -> Result<BTreeMap<String, String>> {
        self.keys_of(server, true).await
    }

    /// [`Federation::current_keys`]; `via_notaries`: whether the notaries may be asked when the
    /// server cannot be reached. A notary's own keys are only ever fetched from the notary, so
    /// two unreachable notaries never ask each other about each other.
    async fn keys_of(
        &self,
        server: &ServerName,
        via_notaries: bool,
    ) -> Result<BTreeMap<String, String>> {
        if server == self.globals.server_name {
            let key = &self.globals.signing_key;
            return Ok([(key.key_id.clone(), key.public_key())]
                .into_iter()
                .collect());
        }
        let now = utils::now_ms();
        if let Some(doc) = self.cached_keys(server, now)? {
            return Ok(verify_keys(&doc));
        }
        // No lock around the fetch: a slow server must not hold up requests from others (two
        // concurrent fetches for one server only fetch twice).
        let (doc, cache_until) = match self.fetch_keys(server).await {
            Ok(found) => found,
            Err(direct) if via_notaries => match self.keys_from_notaries(server).await {
                Some(found) => found,
                None => return Err(direct),
            },
            Err(direct) => return Err(direct),
        };
        let keys = verify_keys(&doc);
        let record = json!({ "doc": doc, "cache_until": cache_until });
        self.storage.put(
            Table::RemoteServerKeys,
            server.as_bytes(),
            &serde_json::to_vec(&record)?,
        )?;
        Ok(keys)
    }

    /// The server's key document as it signed it, if cached and not expired.
    fn cached_keys(&self, server: &ServerName, now: u64) -> Result<Option<Value>> {
        let record: Option<Value> = self
            .storage
            .get_json(Table::RemoteServerKeys, server.as_bytes())?;
        Ok(record
            .filter(|r| {
                r.get("cache_until")
                    .and_then(Value::as_u64)
                    .is_some_and(|until| until > now)
            })
            .and_then(|mut r| r.get_mut("doc").map(Value::take)))
    }

    /// The key document of `server` if it is cached and valid (no request is made).
    pub fn cached_key_document(&self, server: &ServerName) -> Result<Option<Value>> {
        if server == self.globals.server_name {
            return Ok(None);
        }
        self.cached_keys(server, utils::now_ms())
    }

    /// The key document of `server` (fetched if not cached), as that server signed it.
    pub async fn key_document(&self, server: &ServerName) -> Result<Value> {
        self.current_keys(server).await?;
        self.cached_keys(server, utils::now_ms())?
            .ok_or_else(|| bad_keys(server, "no valid key document"))
    }

    /// `GET /_matrix/key/v2/server` of the server, checked; with how long to keep it.
    async fn fetch_keys(&self, server: &ServerName) -> Result<(Value, u64)> {
        let route = self.route_to(server).await?;
        let response = route
            .request(http::Method::GET, "/_matrix/key/v2/server")
            .send()
            .await
            .map_err(|e| unreachable(server, e))?;
        if !response.status().is_success() {
            return Err(bad_keys(server, "the key request failed"));
        }
        let doc = read_json(response).await?;
        check_key_document(server, doc)
    }

    /// A server's key document from the notaries the operator trusts (`trusted_servers`), for a
    /// server that cannot be reached itself: the document must carry the server's own valid
    /// signature and the notary's, whose keys are fetched from the notary directly.
    async fn keys_from_notaries(&self, server: &ServerName) -> Option<(Value, u64)> {
        for notary in self.trusted_servers.iter().take(MAX_NOTARIES) {
            if notary == server || notary == &self.globals.server_name {
                continue;
            }
            match self.ask_notary(notary, server).await {
                Ok(found) => return Some(found),
                Err(e) => tracing::info!(%server, %notary, error = %e, "notary key query failed"),
            }
        }
        None
    }

    async fn ask_notary(&self, notary: &ServerName, server: &ServerName) -> Result<(Value, u64)> {
        let notary_keys = Box::pin(self.keys_of(notary, false)).await?;
        let answer = self
            .send(
                http::Method::POST,
                notary,
                "/_matrix/key/v2/query",
                Some(json!({ "server_keys": { server.as_str(): {} } })),
            )
            .await?;
        let doc = answer
            .get("server_keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .take(16)
            .find(|d| d.get("server_name").and_then(Value::as_str) == Some(server.as_str()))
            .cloned()
            .ok_or_else(|| bad_keys(server, "the notary has no keys for it"))?;
        let mut public = BTreeMap::new();
        for (id, key) in &notary_keys {
            let key = Base64::parse(key).map_err(|_| bad_keys(notary, "a key is not base64"))?;
            public.insert(id.clone(), key);
        }
        let mut map = PublicKeyMap::new();
        map.insert(notary.to_string(), public);
        // Only the notary's signature is checked here (ruma checks every signer the object
        // names against the map); the server's own signature is checked by
        // `check_key_document`.
        let object: CanonicalJsonObject = serde_json::from_value(doc.clone())
            .map_err(|_| bad_keys(server, "the document is not canonical JSON"))?;
        let mut only_notary = object.clone();
        if let Some(ruma::CanonicalJsonValue::Object(sigs)) = only_notary.get_mut("signatures") {
            sigs.retain(|k, _| k == notary.as_str());
        }
        super::verify_signed_by_all(&map, &only_notary)
            .map_err(|_| bad_keys(server, "the notary's signature is wrong"))?;
        // Kept as the server signed it: our own notary adds our signature when it serves it.
        let mut own = object;
        if let Some(ruma::CanonicalJsonValue::Object(sigs)) = own.get_mut("signatures") {
            sigs.retain(|k, _| k == server.as_str());
        }
        let (doc, until) = check_key_document(server, serde_json::to_value(own)?)?;
        if until <= utils::now_ms() {
            return Err(bad_keys(server, "the notary's copy has expired"));
        }
        Ok((doc, until))
    }
}

/// Most notaries asked for one server's keys.
const MAX_NOTARIES: usize = 3;

/// A key document as its server signed it: it must name the server, list keys, and be signed
/// by them. Returns it with how long to keep it.
fn check_key_document(server: &ServerName, doc: Value) -> Result<(Value, u64)> {
    if doc.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
        return Err(bad_keys(server, "the document names another server"));
    }
    let keys = verify_keys(&doc);
    if keys.is_empty() {
        return Err(bad_keys(server, "no verify keys"));
    }
    let mut public = BTreeMap::new();
    for (id, key) in &keys {
        let key = Base64::parse(key).map_err(|_| bad_keys(server, "a key is not base64"))?;
        public.insert(id.clone(), key);
    }
    let mut map = PublicKeyMap::new();
    map.insert(server.to_string(), public);
    let object: CanonicalJsonObject = serde_json::from_value(doc.clone())
        .map_err(|_| bad_keys(server, "the document is not canonical JSON"))?;
    super::verify_signed_by_all(&map, &object)
        .map_err(|_| bad_keys(server, "the self-signature is wrong"))?;
    // Kept no longer than the spec allows (the document itself stays as signed).
    let cap = utils::now_ms() + MAX_VALIDITY_MS;
    let until = doc
        .get("valid_until_ts")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(cap);
    Ok((doc, until))
}

impl Federation {
    /// Our own old keys (rotations), for the notary.
    pub fn own_old_keys(&self) -> Result<BTreeMap<String, crate::service::globals::OldKey>> {
        SigningKey::old_keys(&self.storage)
    }

    /// Add this server's signature to a key document it vouches for (notary).
    pub fn countersign(&self, doc: Value) -> Result<Value> {
        let mut object: CanonicalJsonObject = serde_json::from_value(doc)
            .map_err(|e| Error::internal(format!("key document: {e}")))?;
        ruma::signatures::sign_json(
            self.globals.server_name.as_str(),
            &self.globals.signing_key.keypair,
            &mut object,
        )
        .map_err(|e| Error::internal(format!("countersigning: {e}")))?;
        Ok(serde_json::to_value(object)?)
    }
}

/// Property tests: any key document another server (or a notary) sends is checked without
/// panic and kept no longer than the spec allows; one signed by the keys it lists passes, and
/// any change to it after signing does not.
#[cfg(test)]
mod fuzz {
    use std::sync::OnceLock;

    use base64::Engine;
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{canonical_json, config, json, text, valid_server_name};

    fn key() -> &'static ruma::signatures::Ed25519KeyPair {
        static KEY: OnceLock<ruma::signatures::Ed25519KeyPair> = OnceLock::new();
        KEY.get_or_init(|| {
            let der = ruma::signatures::Ed25519KeyPair::generate();
            ruma::signatures::Ed25519KeyPair::from_der(&der, "fz".to_owned()).expect("a key")
        })
    }

    /// A key document of `server`, signed by the key it lists.
    fn signed(server: &ServerName, valid_until: u64, extra: &Value) -> Value {
        let public = base64::engine::general_purpose::STANDARD_NO_PAD.encode(key().public_key());
        let doc = json!({
            "server_name": server.as_str(),
            "verify_keys": { "ed25519:fz": { "key": public } },
            "old_verify_keys": {},
            "valid_until_ts": valid_until,
            "extra": extra,
        });
        let mut object: CanonicalJsonObject = serde_json::from_value(doc).expect("canonical");
        ruma::signatures::sign_json(server.as_str(), key(), &mut object).expect("signs");
        serde_json::to_value(object).expect("a value")
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn fuzz_any_key_document(
            doc in json(),
            server in valid_server_name(),
            keys in prop::collection::btree_map(text(), json(), 0..4),
        ) {
            let _ = check_key_document(&server, doc.clone());
            // Near valid: the right name, keys of any shape, signatures of any shape.
            let doc = json!({ "server_name": server.as_str(), "verify_keys": keys, "signatures": doc });
            prop_assert!(check_key_document(&server, doc).is_err());
        }

        #[test]
        fn fuzz_signed_key_documents(
            server in valid_server_name(),
            until in prop_oneof![0u64..(1 << 53), Just(0u64), Just((1u64 << 53) - 1)],
            extra in canonical_json(),
            change in json(),
        ) {
            let doc = signed(&server, until, &extra);
            let before = utils::now_ms();
            let (kept, kept_until) =
                check_key_document(&server, doc.clone()).expect("a signed document passes");
            prop_assert_eq!(&kept, &doc);
            // Kept until it says, but never longer than seven days.
            prop_assert!(kept_until <= utils::now_ms() + MAX_VALIDITY_MS);
            prop_assert!(kept_until == until || (kept_until < until && kept_until >= before + MAX_VALIDITY_MS));
            // Changed after signing: refused.
            let mut changed = doc.clone();
            changed["extra"] = change;
            if changed["extra"] != doc["extra"] {
                prop_assert!(check_key_document(&server, changed).is_err());
            }
            // Presented as another server's: refused.
            let other = <&ServerName>::try_from("other.example").expect("a name");
            if other != server {
                prop_assert!(check_key_document(other, doc).is_err());
            }
        }
    }
}
