//! quotad over real HTTP, against real Redis and Postgres. One binary; one file per feature.

mod auth;
mod consume;
mod errors;
mod idempotency;
mod outages;
mod periods;
mod plans;
mod process;

pub mod helpers;
