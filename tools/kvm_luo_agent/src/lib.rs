// SPDX-License-Identifier: GPL-2.0
//! The live-update agent of a KVM host with several VMs (`kvm-luo-agent`), and the operator's
//! client (`kvm-luo-ctl`). Only one process can hold `/dev/liveupdate`: the agent holds it,
//! hands each VMM a LUO session of its own over a Unix socket (the protocol is the crate
//! `kvm-luo-protocol`), and performs the live update once every VMM says its guest is
//! preserved; in the new kernel it hands each restarted VMM the session the previous kernel
//! kept for it. [`fleet`] is what the agent knows and decides, without I/O.

#![deny(missing_docs)]

pub mod fleet;
