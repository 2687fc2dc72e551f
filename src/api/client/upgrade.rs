//! Room upgrades: `POST /rooms/{roomId}/upgrade`.

use std::sync::Arc;

use axum::{extract::State, Router};
use ruma::api::client::room::upgrade_room;

use crate::{
    api::ruma_wrapper::{ruma_route, Ruma, RumaResponse},
    error::Result,
    service::Services,
};

pub fn routes(r: Router<Arc<Services>>) -> Router<Arc<Services>> {
    ruma_route::<upgrade_room::v3::Request, _, _>(r, upgrade)
}

async fn upgrade(
    State(s): State<Arc<Services>>,
    req: Ruma<upgrade_room::v3::Request>,
) -> Result<RumaResponse<upgrade_room::v3::Response>> {
    let who = req.user()?;
    who.ensure_may_act()?;
    let new_room = s
        .rooms
        .upgrade_room(
            &req.room_id,
            &who.user_id,
            &req.new_version,
            &req.additional_creators,
        )
        .await?;
    Ok(upgrade_room::v3::Response::new(new_room).into())
}
