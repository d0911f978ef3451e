//! quotad meters usage and enforces monthly plan limits.
//!
//! ```text
//!  gateway ──HTTP──▶ http (router, auth, JSON) ──▶ quota (decisions)
//!  Envoy ───gRPC──▶ grpc (ShouldRateLimit) ─────────┘
//!                                                    │        │
//!                              one EVALSHA per call ─┘        └─ hydration, plans
//!                                   ▼                                 ▼
//!                         store (Redis: counters,             db (Postgres: usage_tracking,
//!                          dirty sets, idempotency)                user_plans, migrations)
//! ```
//!
//! - [`period`]: billing-month math, pure.
//! - [`plans`]: the plans file, validated and hot-swappable; [`overage`]: use past a limit.
//! - [`store`]: Redis keys and the Lua scripts in `lua/`.
//! - [`db`]: Postgres queries and migrations.
//! - [`quota`]: decisions in domain terms, with hydration and fail policies; [`items`]: several
//!   types in one call, all or nothing.
//! - [`hydrate`]: counters Redis does not hold, loaded from Postgres in batches.
//! - [`refusals`]: the near-cache of refusals and its pub/sub invalidation.
//! - [`reservations`]: holds against the limit until the work's cost is known, and their sweeper.
//! - [`flusher`]: writes dirty Redis counters through to Postgres.
//! - [`gate`]: the gate's route table, for gateways that ask before proxying.
//! - [`history`]: a user's usage in past periods; [`export`]: every user's totals of a period,
//!   streamed for invoicing.
//! - [`http`]: the v1 API.
//! - [`grpc`]: Envoy's rate-limit service and grpc.health.v1, on `QUOTAD_GRPC_LISTEN`.
//! - [`app`]: wiring, start-up and shutdown.

pub mod accounts;
pub mod app;
pub mod clock;
pub mod config;
pub mod db;
pub mod events;
pub mod export;
pub mod flusher;
pub mod gate;
pub mod grpc;
pub mod history;
pub mod http;
pub mod hydrate;
pub mod items;
pub mod metrics;
pub mod overage;
pub mod period;
pub mod plans;
pub mod quota;
pub mod reconcile;
pub mod refusals;
pub mod reservations;
pub mod routes;
pub mod store;
pub mod telemetry;
pub mod webhooks;
