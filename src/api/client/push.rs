//! Push rules: the user's rule set (server defaults until the user changes them). Clients such as
//! Element read it at start; editing rules and pushers arrive with the push work.

use std::sync::Arc;

use axum::{extract::State, Router};
use ruma::{
    api::client::push::{get_pushrules_all, get_pushrules_global_scope},
    push::Ruleset,
    UserId,
};

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma, RumaResponse},
    error::Result,
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    let r = ruma_route::<get_pushrules_all::v3::Request, _, _>(r, all);
    ruma_route::<get_pushrules_global_scope::v3::Request, _, _>(r, global)
}

/// The stored rule set (account data `m.push_rules`) or the server defaults.
fn ruleset(s: &Services, user: &UserId) -> Result<Ruleset> {
    let stored = s.account_data.get(user, None, "m.push_rules")?;
    Ok(stored
        .and_then(|v| serde_json::from_value::<Ruleset>(v.get("global").cloned()?).ok())
        .unwrap_or_else(|| Ruleset::server_default(user)))
}

async fn all(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<RumaResponse<get_pushrules_all::v3::Response>> {
    let rules = ruleset(&s, &req.user()?.user_id)?;
    Ok(get_pushrules_all::v3::Response::new(rules).into())
}

async fn global(
    State(s): State<Arc<Services>>,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<RumaResponse<get_pushrules_global_scope::v3::Response>> {
    let rules = ruleset(&s, &req.user()?.user_id)?;
    Ok(get_pushrules_global_scope::v3::Response::new(rules).into())
}
