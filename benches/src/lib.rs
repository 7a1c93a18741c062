//! thaw's benchmark lab, reached through `thaw bench` and `thaw demo`.
//!
//! The shipped binary ships the product; everything that only measures it
//! lives here: generated workloads and their read plans ([`workload`]), a
//! user-space link emulator ([`link`]), the machine's ceilings
//! ([`ceilings`]), drivers for peers on the same data ([`peers`]), the
//! startup, mount, load, virtio-fs and VM suites, the chart, and the demo.
//! Entry points take a
//! plain config and return a report that serializes to the suite's JSON and
//! displays as its table; the CLI parses flags and prints.
//!
//! The lab measures thaw as users run it: mounts are real `thaw mount`
//! processes of the binary named in the config, and every call into thaw's
//! libraries goes through one module ([`thaw`]).

pub mod ceilings;
pub mod chart;
pub mod demo;
pub mod link;
pub mod load;
pub mod mount_suite;
mod peers;
pub mod pip_env;
pub mod startup;
pub mod sys;
pub mod thaw;
pub mod virtiofs_suite;
pub mod vm_suite;
pub mod workload;

pub use demo::{DemoConfig, DemoReport};
pub use link::Link;
pub use load::{LoadConfig, LoadReport};
pub use mount_suite::{MountReport, MountSuiteConfig};
pub use startup::{Images, Peers, StartupConfig, StartupReport};
pub use workload::Workload;
