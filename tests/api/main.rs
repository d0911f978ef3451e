//! quotad over real HTTP, against real Redis and Postgres. One binary; one file per feature.

mod accounts;
mod auth;
mod cluster;
mod consume;
mod durability;
mod errors;
mod faults;
mod flusher;
mod gate;
mod gateways;
mod grpc;
mod hydration;
mod idempotency;
mod inputs;
mod model;
mod month_start;
mod notifications;
mod observability;
mod openapi;
mod outages;
mod overage;
mod performance;
mod periods;
mod plans;
mod process;
mod prometheus;
mod redis_faults;
mod refusals;
mod reservations;
mod schemathesis;
mod script_contracts;
mod serving;
mod soak;
mod startup;
mod ui;

pub mod helpers;
