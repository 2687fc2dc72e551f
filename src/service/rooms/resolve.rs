//! State resolution: when branches of a room's history disagree about its state, ruma's
//! implementation of the room version's algorithm (v2, and v2.1 for room version 12) decides.
//! This file only feeds it: the states, their auth chains, the events, and for v12 the conflicted
//! state subgraph.

use std::collections::{HashMap, HashSet};

use ruma::{
    events::StateEventType,
    room_version_rules::StateResolutionVersion,
    state_res::{utils::event_id_set::EventIdSet, StateMap},
    EventId, OwnedEventId, RoomId, RoomVersionId,
};

use super::{append::rules_for, Pdu, Rooms, StateIds};
use crate::error::{Error, Result};

/// The most events the conflicted state subgraph walk visits.
const SUBGRAPH_LIMIT: usize = 50_000;

impl Rooms {
    /// The resolved state of several states of `room_id` (its forks). Resolution is only ever
    /// given events of that one room: an event of another room in a state is an error
    /// (`M_BAD_JSON`, [`Rooms::pdu_of_room`]), and the events the algorithm reads (auth chains,
    /// the conflicted subgraph) are read through the same room check.
    pub fn resolve_states(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        states: &[StateIds],
    ) -> Result<StateIds> {
        match states {
            [] => return Ok(StateIds::new()),
            [one] => return Ok(one.clone()),
            [first, rest @ ..] if rest.iter().all(|s| s == first) => {
                // The common fork: two branches that differ only in messages. Nothing to
                // resolve, and the auth chains (the costly part) are not needed.
                return Ok(first.clone());
            }
            _ => {}
        }
        let rules = rules_for(version)?;
        let v2_rules = match rules.state_res {
            StateResolutionVersion::V2(r) => r,
            // Room versions 1 and 2 are resolved with the v2 algorithm too (ruma has no v1; the
            // difference only shows in rare conflicts, and these versions are long superseded).
            _ => ruma::room_version_rules::StateResolutionV2Rules::V2_0,
        };
        let maps: Vec<StateMap<OwnedEventId>> = states
            .iter()
            .map(|s| {
                s.iter()
                    .map(|((t, k), id)| ((StateEventType::from(t.as_str()), k.clone()), id.clone()))
                    .collect()
            })
            .collect();
        // Events read once per resolution: the algorithm looks at each many times. The states'
        // own events go in first, each checked to be of the room.
        let mut read: HashMap<OwnedEventId, Option<Pdu>> = HashMap::new();
        for id in states.iter().flat_map(|s| s.values()) {
            if !read.contains_key(id) {
                read.insert(id.clone(), self.pdu_of_room(room_id, id)?);
            }
        }
        let mut auth_chains = Vec::with_capacity(states.len());
        for s in states {
            let chain = self.auth_chain(room_id, s.values().map(|id| id.as_ref()))?;
            auth_chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
        }
        let cache: parking_lot::Mutex<HashMap<OwnedEventId, Option<Pdu>>> =
            parking_lot::Mutex::new(read);
        let fetch = |id: &EventId| -> Option<Pdu> {
            if let Some(p) = cache.lock().get(id) {
                return p.clone();
            }
            let p = self.pdu_of_room_or_none(room_id, id);
            cache.lock().insert(id.to_owned(), p.clone());
            p
        };
        let subgraph = |conflicted: &StateMap<Vec<OwnedEventId>>| {
            self.conflicted_subgraph(conflicted.values().flatten(), &fetch)
        };
        let resolved = ruma::state_res::resolve(
            &rules.authorization,
            &v2_rules,
            &maps,
            auth_chains,
            fetch,
            subgraph,
        )
        .map_err(|e| Error::internal(format!("state resolution: {e}")))?;
        Ok(resolved
            .into_iter()
            .map(|((t, k), id)| ((t.to_string(), k), id))
            .collect())
    }

    /// The conflicted state subgraph (room version 12): the events that lie on an auth path from
    /// one conflicted event to another, conflicted events included.
    fn conflicted_subgraph<'a>(
        &self,
        conflicted: impl Iterator<Item = &'a OwnedEventId>,
        fetch: &impl Fn(&EventId) -> Option<Pdu>,
    ) -> Option<EventIdSet<OwnedEventId>> {
        let targets: HashSet<OwnedEventId> = conflicted.cloned().collect();
        // reaches[x]: x is a conflicted event or some conflicted event is in x's auth chain.
        let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
        let mut out = EventIdSet::new();
        let mut visited = 0usize;
        for start in &targets {
            // Iterative post-order walk down the auth events.
            let mut stack: Vec<(OwnedEventId, bool)> = vec![(start.clone(), false)];
            while let Some((id, expanded)) = stack.pop() {
                if reaches.contains_key(&id) {
                    continue;
                }
                visited += 1;
                if visited > SUBGRAPH_LIMIT {
                    return None;
                }
                let auth = fetch(&id).map(|p| p.auth_events).unwrap_or_default();
                if !expanded {
                    stack.push((id.clone(), true));
                    for a in auth {
                        if !reaches.contains_key(&a) {
                            stack.push((a, false));
                        }
                    }
                    continue;
                }
                let r = auth.iter().any(|a| reaches.get(a) == Some(&true));
                // A conflicted event counts itself; an event between two counts when one of its
                // ancestors is conflicted and it is itself an ancestor of a conflicted event,
                // which holds for every event this walk from a conflicted event reaches.
                reaches.insert(id.clone(), r || targets.contains(&id));
                if r || targets.contains(&id) {
                    out.insert(id);
                }
            }
        }
        Some(out)
    }
}
