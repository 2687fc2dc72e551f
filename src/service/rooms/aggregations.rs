//! Server-side aggregation of relations, bundled into `unsigned.m.relations` of every event a
//! client receives: the thread summary (`m.thread`), the latest edit (`m.replace`) and the
//! references (`m.reference`). Read from the relations index (`relations.rs`).

use ruma::UserId;
use serde_json::{json, Map, Value};

use super::{relations::Child, Pdu, Rooms};
use crate::{
    error::Result,
    storage::{keys, Table},
};

/// Most children of one event looked at for its aggregations.
const MAX_CHILDREN: usize = 1000;
/// Most references listed.
const MAX_REFERENCES: usize = 100;

/// A thread's summary for one user.
pub struct ThreadSummary {
    pub count: u64,
    pub latest: Option<String>,
    pub participated: bool,
}

impl Rooms {
    /// The children of `parent` from the index, oldest first (at most [`MAX_CHILDREN`]).
    fn children(&self, parent: &str) -> Result<Vec<(u64, Child)>> {
        let mut out = Vec::new();
        for entry in self
            .storage
            .scan_prefix(Table::Relations, &keys::prefix(&[parent]))?
            .take(MAX_CHILDREN)
        {
            let (k, v) = entry?;
            let (Some(count), Ok(child)) = (keys::count_suffix(&k), serde_json::from_slice(&v))
            else {
                continue;
            };
            out.push((count, child));
        }
        Ok(out)
    }

    /// The sender of a child (older index entries do not carry it).
    fn child_sender(&self, child: &Child) -> Result<String> {
        if !child.sender.is_empty() {
            return Ok(child.sender.clone());
        }
        Ok(self
            .pdu(&child.event_id)?
            .map(|p| p.sender.to_string())
            .unwrap_or_default())
    }

    pub fn thread_summary(&self, root: &Pdu, user: &UserId) -> Result<ThreadSummary> {
        let mut summary = ThreadSummary {
            count: 0,
            latest: None,
            participated: root.sender == user,
        };
        for (_, child) in self.children(root.event_id.as_str())? {
            if child.rel_type != "m.thread" {
                continue;
            }
            summary.count += 1;
            if !summary.participated && self.child_sender(&child)? == user.as_str() {
                summary.participated = true;
            }
            summary.latest = Some(child.event_id);
        }
        Ok(summary)
    }

    /// `unsigned.m.relations` for `pdu` as `user` sees it, or None when nothing relates to it.
    pub fn bundled_relations(&self, pdu: &Pdu, user: &UserId) -> Result<Option<Value>> {
        let children = self.children(pdu.event_id.as_str())?;
        if children.is_empty() || is_redacted(pdu) {
            return Ok(None);
        }
        let mut out = Map::new();
        let mut thread_count = 0u64;
        let mut thread_latest = None;
        let mut participated = pdu.sender == user;
        let mut latest_edit = None;
        let mut references = Vec::new();
        for (_, child) in &children {
            match child.rel_type.as_str() {
                "m.thread" => {
                    thread_count += 1;
                    thread_latest = Some(child.event_id.as_str());
                    if !participated && self.child_sender(child)? == user.as_str() {
                        participated = true;
                    }
                }
                // Only the original sender's edits of the same type are edits.
                "m.replace"
                    if child.kind == pdu.kind.to_string()
                        && self.child_sender(child)? == pdu.sender.as_str() =>
                {
                    latest_edit = Some(child.event_id.as_str());
                }
                "m.reference" if references.len() < MAX_REFERENCES => {
                    references.push(json!({ "event_id": child.event_id }));
                }
                _ => {}
            }
        }
        if let Some(latest) = thread_latest {
            if let Some(latest) = self.pdu(latest)? {
                let mut latest_event = latest.to_client_value(None);
                // The latest reply shows its own latest edit.
                if let Some(edit) = self.latest_edit(&latest)? {
                    latest_event["unsigned"]["m.relations"] = json!({ "m.replace": edit });
                }
                out.insert(
                    "m.thread".into(),
                    json!({
                        "latest_event": latest_event,
                        "count": thread_count,
                        "current_user_participated": participated,
                    }),
                );
            }
        }
        if let Some(edit) = latest_edit {
            if let Some(edit) = self.pdu(edit)? {
                out.insert("m.replace".into(), edit.to_client_value(None));
            }
        }
        if !references.is_empty() {
            out.insert("m.reference".into(), json!({ "chunk": references }));
        }
        Ok((!out.is_empty()).then_some(Value::Object(out)))
    }

    fn latest_edit(&self, pdu: &Pdu) -> Result<Option<Value>> {
        let mut latest = None;
        for (_, child) in self.children(pdu.event_id.as_str())? {
            if child.rel_type == "m.replace"
                && child.kind == pdu.kind.to_string()
                && self.child_sender(&child)? == pdu.sender.as_str()
            {
                latest = Some(child.event_id);
            }
        }
        Ok(match latest {
            Some(id) => self.pdu(&id)?.map(|p| p.to_client_value(None)),
            None => None,
        })
    }
}

fn is_redacted(pdu: &Pdu) -> bool {
    pdu.unsigned
        .as_ref()
        .is_some_and(|u| u.contains_key("redacted_because"))
}
