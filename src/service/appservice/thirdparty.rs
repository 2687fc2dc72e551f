//! Third-party networks (`/_matrix/client/v3/thirdparty/...`): the protocols appservices declare
//! (`protocols` in their registration), asked of them (`/_matrix/app/v1/thirdparty/...`).
//! An appservice that fails or answers nonsense is left out. Instances get an `instance_id`
//! (`<appservice id>|<network_id>`), which `publicRooms` takes as `third_party_instance_id`.

use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    service::Services,
};

/// Most entries a lookup answers (the appservices' answers are concatenated).
const MAX_RESULTS: usize = 1000;

/// The instance id a network of an appservice has here.
pub fn instance_id(appservice: &str, network_id: &str) -> String {
    format!("{appservice}|{network_id}")
}

/// Every declared protocol with the metadata its appservice gives.
pub async fn protocols(s: &Services) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for a in s.appservices.all().iter() {
        for protocol in a.registration.protocols.iter().flatten() {
            if out.contains_key(protocol) {
                continue;
            }
            if let Some(p) = protocol_of(s, a, protocol).await {
                out.insert(protocol.clone(), p);
            }
        }
    }
    Ok(out)
}

/// One protocol's metadata (404 `M_NOT_FOUND` when no appservice offers it).
pub async fn protocol(s: &Services, protocol: &str) -> Result<Value> {
    for a in s.appservices.all().iter() {
        if a.declares_protocol(protocol) {
            if let Some(p) = protocol_of(s, a, protocol).await {
                return Ok(p);
            }
        }
    }
    Err(Error::not_found("No bridge offers this protocol"))
}

async fn protocol_of(s: &Services, a: &super::Appservice, protocol: &str) -> Option<Value> {
    let mut p = s
        .appservices
        .client
        .thirdparty(s, a, &["protocol", protocol], &[])
        .await?;
    let obj = p.as_object_mut()?;
    if let Some(Value::Array(instances)) = obj.get_mut("instances") {
        for i in instances.iter_mut().take(MAX_RESULTS) {
            if let Some(network) = i.get("network_id").and_then(Value::as_str) {
                let id = instance_id(a.id(), network);
                i["instance_id"] = Value::String(id);
            }
        }
    } else {
        obj.insert("instances".into(), Value::Array(Vec::new()));
    }
    Some(p)
}

/// A lookup (`kind`: `location` or `user`), for one protocol or (None) a reverse lookup across
/// all appservices with protocols. The answers are concatenated.
pub async fn lookup(
    s: &Services,
    kind: &str,
    protocol: Option<&str>,
    query: &[(String, String)],
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut offered = false;
    for a in s.appservices.all().iter() {
        let segments: Vec<&str> = match protocol {
            Some(p) if a.declares_protocol(p) => vec![kind, p],
            Some(_) => continue,
            None if a
                .registration
                .protocols
                .as_ref()
                .is_some_and(|p| !p.is_empty()) =>
            {
                vec![kind]
            }
            None => continue,
        };
        offered = true;
        if let Some(Value::Array(found)) = s
            .appservices
            .client
            .thirdparty(s, a, &segments, query)
            .await
        {
            out.extend(found.into_iter().filter(Value::is_object));
        }
        if out.len() >= MAX_RESULTS {
            out.truncate(MAX_RESULTS);
            break;
        }
    }
    if protocol.is_some() && !offered {
        return Err(Error::not_found("No bridge offers this protocol"));
    }
    Ok(out)
}
