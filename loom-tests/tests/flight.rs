//! The flight state machine alone: models that live inside the crate
//! (`src/loom_models.rs`, they use its internal types), run from here.
#![cfg(loom)]

use epochflight::loom_models;

#[test]
fn hand_off_goes_to_exactly_one_heir() {
    loom_models::hand_off_goes_to_exactly_one_heir();
}

#[test]
fn a_follower_registering_during_publish_is_woken() {
    loom_models::a_follower_registering_during_publish_is_woken();
}

#[test]
fn the_last_heir_leaving_races_a_hand_off() {
    loom_models::the_last_heir_leaving_races_a_hand_off();
}
