//! Approval gates: risky operations wait for eligible approvers (issue #15).
//!
//! `catalogue` says which operations are gated and how; `request` holds one
//! request and the rules of deciding it. The service that stores requests,
//! audits decisions and hands approved operations to the jobs service builds
//! on these.

pub mod catalogue;
pub mod execute;
pub mod gate;
pub mod notify;
pub mod owner;
pub mod params;
pub mod request;
pub mod service;
pub mod store;

pub use catalogue::{Operation, OperationPolicy, RiskLevel};
pub use notify::{Approver, Event, Notification, Notifier, WebhookSettings};
pub use params::OperationParams;
pub use request::{Approval, ApprovalRequest, ApproveInput, Decider, Refusal, Status};
pub use service::{ApprovalError, ApprovalService, ApprovalSettings, Requester};
