//! The server's published signing keys (`/_matrix/key/v2/server`): the current key, the keys of
//! earlier rotations as `old_verify_keys`, how long the answer may be cached, and the server's
//! signature over it all.

use std::sync::Arc;

use ruma::{signatures::sign_json, CanonicalJsonObject};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    service::globals::{Globals, SigningKey},
    storage::Storage,
    utils,
};

/// How long other servers may cache our keys (`valid_until_ts`). Rotation publishes the old key
/// as expired, so a day bounds how long a rotated key is still trusted for new signatures.
const KEY_VALIDITY_MS: u64 = 24 * 3600 * 1000;

pub struct ServerKeys {
    storage: Storage,
    globals: Arc<Globals>,
}

impl ServerKeys {
    pub fn new(storage: Storage, globals: Arc<Globals>) -> ServerKeys {
        ServerKeys { storage, globals }
    }

    /// The key document, signed with the current key.
    pub fn signed_response(&self) -> Result<Value> {
        let key = &self.globals.signing_key;
        let mut old = Map::new();
        for (id, k) in SigningKey::old_keys(&self.storage)? {
            old.insert(id, json!({ "key": k.key, "expired_ts": k.expired_ts }));
        }
        let doc = json!({
            "server_name": self.globals.server_name,
            "valid_until_ts": utils::now_ms() + KEY_VALIDITY_MS,
            "verify_keys": { key.key_id.clone(): { "key": key.public_key() } },
            "old_verify_keys": old,
        });
        let mut object: CanonicalJsonObject = serde_json::from_value(doc)?;
        sign_json(self.globals.server_name.as_str(), &key.keypair, &mut object)
            .map_err(|e| Error::internal(format!("signing the key document: {e}")))?;
        Ok(serde_json::to_value(object)?)
    }
}
