//! Dehydrated devices (MSC3814): one per user, a device without tokens whose keys other users
//! encrypt to while the user is offline. A new login fetches it (`device_data`, encrypted by the
//! client), drains its to-device inbox through `/events` and then replaces it.

use ruma::{OwnedDeviceId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    error::{Error, Result},
    service::{accounts::Identity, e2ee, Services},
    storage::{Batch, Storage, Table},
};

/// Serializes replacing and deleting a user's dehydrated device (several writes: two requests
/// at once could otherwise leave two devices or none recorded).
#[derive(Default)]
pub struct Dehydration {
    write: parking_lot::Mutex<()>,
}

/// The largest `device_data` accepted (it is an encrypted pickle of the device's keys).
const MAX_DEVICE_DATA_BYTES: usize = 64 * 1024;

#[derive(Serialize, Deserialize)]
struct Dehydrated {
    device_id: OwnedDeviceId,
    device_data: Value,
}

fn stored(s: &Services, user: &UserId) -> Result<Option<Dehydrated>> {
    s.storage
        .get_json(Table::DehydratedDevices, user.as_bytes())
}

/// `PUT /dehydrated_device`: replace the user's dehydrated device with a new one, upload its
/// keys. Returns the device id.
pub fn put(s: &Services, user: &UserId, body: &Map<String, Value>) -> Result<Value> {
    let device_id: OwnedDeviceId = match body.get("device_id") {
        Some(Value::String(d)) if !d.is_empty() && d.len() <= 255 => d.as_str().into(),
        Some(_) => return Err(Error::invalid_param("device_id must be a non-empty string")),
        None => return Err(Error::bad_json("Missing 'device_id'")),
    };
    let device_data = match body.get("device_data") {
        Some(Value::Object(d)) => d.clone(),
        Some(_) => return Err(Error::bad_json("'device_data' must be an object")),
        None => return Err(Error::bad_json("Missing 'device_data'")),
    };
    if !device_data.get("algorithm").is_some_and(Value::is_string) {
        return Err(Error::bad_json("'device_data' needs an 'algorithm'"));
    }
    if serde_json::to_vec(&device_data)?.len() > MAX_DEVICE_DATA_BYTES {
        return Err(Error::new(
            crate::error::ErrCode::TooLarge,
            "device_data is too large",
        ));
    }
    let display_name = match body.get("initial_device_display_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => {
            return Err(Error::bad_json(
                "initial_device_display_name must be a string",
            ))
        }
    };
    let _guard = s.dehydrated.write.lock();
    let previous = stored(s, user)?;
    let in_use = s.accounts.device(user, &device_id)?.is_some()
        && previous.as_ref().is_none_or(|p| p.device_id != device_id);
    if in_use {
        return Err(Error::invalid_param("A device with this id exists already"));
    }
    if let Some(p) = previous {
        s.accounts.remove_device(user, &p.device_id)?;
    }
    s.accounts
        .create_device_without_tokens(user, &device_id, display_name)?;
    let record = Dehydrated {
        device_id: device_id.clone(),
        device_data: Value::Object(device_data),
    };
    s.storage.put(
        Table::DehydratedDevices,
        user.as_bytes(),
        &serde_json::to_vec(&record)?,
    )?;
    // The device's keys, as if the device itself had uploaded them.
    let as_device = Identity {
        user_id: user.to_owned(),
        device_id: device_id.clone(),
        admin: false,
        guest: false,
        locked: false,
        suspended: false,
        appservice: None,
        accepted_notice: None,
        consent_uri: None,
    };
    let mut keys = Map::new();
    for k in ["device_keys", "one_time_keys", "fallback_keys"] {
        if let Some(v) = body.get(k) {
            keys.insert(k.into(), v.clone());
        }
    }
    if let Err(e) = e2ee::upload_keys(s, &as_device, &keys) {
        // Keys that do not belong to this device: no half-made dehydrated device stays.
        s.accounts.remove_device(user, &device_id)?;
        return Err(e);
    }
    Ok(json!({ "device_id": device_id }))
}

/// `GET /dehydrated_device`.
pub fn get(s: &Services, user: &UserId) -> Result<Value> {
    let d = stored(s, user)?.ok_or_else(none)?;
    Ok(json!({ "device_id": d.device_id, "device_data": d.device_data }))
}

/// `DELETE /dehydrated_device`.
pub fn delete(s: &Services, user: &UserId) -> Result<Value> {
    let _guard = s.dehydrated.write.lock();
    let d = stored(s, user)?.ok_or_else(none)?;
    s.accounts.remove_device(user, &d.device_id)?;
    Ok(json!({ "device_id": d.device_id }))
}

/// `POST /dehydrated_device/{deviceId}/events`: the device's to-device messages after
/// `next_batch` (those up to it are deleted: the caller has them).
pub fn events(
    s: &Services,
    user: &UserId,
    device_id: &str,
    next_batch: Option<&str>,
) -> Result<Value> {
    let d = stored(s, user)?.ok_or_else(none)?;
    if d.device_id.as_str() != device_id {
        return Err(Error::forbidden("This is not your dehydrated device"));
    }
    let acknowledged = next_batch
        .map(|t| {
            t.parse::<u64>()
                .map_err(|_| Error::invalid_param("Invalid next_batch"))
        })
        .transpose()?;
    if let Some(a) = acknowledged {
        s.to_device.acknowledge(user, &d.device_id, a)?;
    }
    let (events, last, _) = s.to_device.pending(
        user,
        &d.device_id,
        s.globals.counter.watermark(),
        crate::service::to_device::MAX_PER_SYNC,
    )?;
    let next = last.or(acknowledged).unwrap_or(0);
    Ok(json!({ "events": events, "next_batch": next.to_string() }))
}

fn none() -> Error {
    Error::not_found("No dehydrated device")
}

/// Forget the dehydrated device record when its device is deleted, in the deleting batch.
pub fn remove_device_rows(
    storage: &Storage,
    batch: &mut Batch,
    user: &UserId,
    device_id: &str,
) -> Result<()> {
    let current: Option<Dehydrated> =
        storage.get_json(Table::DehydratedDevices, user.as_bytes())?;
    if current.is_some_and(|d| d.device_id.as_str() == device_id) {
        batch.delete(Table::DehydratedDevices, user.as_bytes())?;
    }
    Ok(())
}
