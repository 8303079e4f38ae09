// SPDX-License-Identifier: GPL-2.0
//! The agent's protocol: one JSON object per `SOCK_SEQPACKET` message on a Unix socket, a
//! session's file descriptor attached (`SCM_RIGHTS`) to the answer that hands it over.
//!
//! A VMM connects, sends [`ToAgent::Session`] and gets [`FromAgent::Session`] with the
//! session's fd. It then reports its [`VmmState`] with [`ToAgent::State`] and waits for events
//! on the same connection: [`FromAgent::Prepare`] (stop the guest, save its state, preserve
//! everything in the session, answer [`ToAgent::Ready`] or [`ToAgent::NotReady`]) and
//! [`FromAgent::Abort`] (the update will not happen: close the session fd, answer
//! [`ToAgent::Release`], resume the guest, ask for a new session). If the update happens the
//! host kexecs with the VMM still waiting. The connection is the registration: a VMM that
//! disconnects is forgotten and its session closed, unless it is the previous kernel's and
//! was not released: the agent keeps that one for the next VMM.
//!
//! An operator sends [`ToAgent::Status`] or [`ToAgent::Update`]; an update answers
//! [`FromAgent::Armed`] once every VMM is ready, and waits for [`ToAgent::Commit`] (kexec) or
//! [`ToAgent::Cancel`] on the same connection.
//!
//! Every connection starts with [`ToAgent::Hello`], which carries the client's
//! [`PROTOCOL_VERSION`]; the agent answers [`FromAgent::Hello`] with the version both speak
//! (the agent speaks every version from [`PROTOCOL_MIN_VERSION`] to its own), or refuses a
//! version it does not speak (`EPROTONOSUPPORT`) and closes the connection. A change that an
//! older peer handles safely keeps the version: a new request, which an older agent refuses
//! (`EPROTO`), a new event, which an older client skips, a new field whose absence means what
//! the older peer does. A field an older peer would ignore to harm (one that restricts what a
//! request does) is a new request instead; any other change raises the version.
//!
//! What is kept across a kexec or a restart carries a format version the same way
//! ([`decode_versioned`]): a reader refuses a format later than it knows, cleanly, instead of
//! reading it wrong.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every message is shorter than this (a status of hundreds of VMMs fits).
pub const MAX_MESSAGE: usize = 256 << 10;

/// The longest detail or reason the agent keeps.
pub const MAX_TEXT: usize = 512;

/// `text` without control characters, cut to [`MAX_TEXT`] bytes at a character boundary
/// (so that it takes at most twice that once escaped in JSON).
pub fn bounded(text: String) -> String {
    let mut text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The version of the protocol this side speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest version of the protocol the agent still speaks.
pub const PROTOCOL_MIN_VERSION: u32 = 1;

/// The version of the format of [`Handover`] this side writes, and the latest it reads. The
/// handover is kept in the session [`AGENT_SESSION`], at token 1, in the latest format the
/// oldest agent still in use reads (format 1 so far: an agent may kexec back into an older
/// one); an agent that writes a later format adds it at the token of its version, in the same
/// session, beside it.
pub const HANDOVER_VERSION: u32 = 1;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kvm-luo-agent.sock";

/// The session in which the agent keeps its [`Handover`] across the kexec. VMMs may not have
/// a session whose name starts with it.
pub const AGENT_SESSION: &str = "kvm-luo-agent";

/// What a VMM tells the agent about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmState {
    /// Starting or restoring its guest.
    Starting,
    /// Its guest runs and its checks pass.
    Running,
    /// Stopping its guest and preserving it, for an update.
    Preparing,
    /// Everything preserved: the host may kexec.
    Ready,
    /// Its guest runs again after an update that did not happen.
    Continued,
    /// Its guest, retrieved after the kexec, runs again and its checks pass.
    Resumed,
    /// Something went wrong; the detail says what.
    Failed,
}

/// A message to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToAgent {
    /// The first message of every connection. Answer: [`FromAgent::Hello`], or an error and
    /// the end of the connection if the agent does not speak `version`.
    Hello {
        /// The [`PROTOCOL_VERSION`] of the client.
        version: u32,
    },
    /// A VMM asks for its session: the one the previous kernel preserved under `name` if there
    /// is one, a new one otherwise. Answer: [`FromAgent::Session`] with the fd, or an error.
    Session {
        /// The session's name, one per VM.
        name: String,
        /// The VMM's process ID, for status.
        pid: u32,
    },
    /// A VMM reports how it is doing. No answer.
    State {
        /// Its state.
        state: VmmState,
        /// Free text for the operator.
        detail: String,
    },
    /// A VMM answers [`FromAgent::Prepare`]: everything is preserved. No answer.
    Ready,
    /// A VMM answers [`FromAgent::Prepare`]: it cannot be updated. No answer.
    NotReady {
        /// Why.
        reason: String,
    },
    /// A VMM closed its session fd (after [`FromAgent::Abort`], or after finishing the
    /// session the previous kernel kept): the agent closes its own and forgets the claim, and
    /// the VMM asks for a session again. No answer.
    Release,
    /// Answer: [`FromAgent::Status`].
    Status,
    /// Perform a live update: load the kernel (required), prepare every
    /// VMM and wait at most `timeout_ms` for all to be ready. Answer: [`FromAgent::Armed`],
    /// or an error after every VMM was told to abort.
    Update(UpdateRequest),
    /// Every check of the [`ToAgent::Update`] with the same fields (the fleet, the timeout,
    /// the kernel's files and command line); nothing is loaded or stopped. Answer:
    /// [`FromAgent::WouldUpdate`], or the error the update would get. (A request of its own,
    /// not a field of `update`: an agent that does not know it refuses it rather than update.)
    CheckUpdate(UpdateRequest),
    /// A VMM gives the previous kernel's session back, untouched but for what it retrieved
    /// (a state of a format it cannot read): the agent keeps it for another VMM. Answer:
    /// [`FromAgent::Done`]; then the VMM closes its copy (it may exit).
    GiveBack,
    /// After [`FromAgent::Armed`]: kexec. Answer: none if it works, an error otherwise.
    Commit,
    /// An operator says the VM `name` is gone for good: updates stop waiting for its VMM.
    /// Answer: [`FromAgent::Done`].
    Forget {
        /// The VM.
        name: String,
    },
    /// After [`FromAgent::Armed`]: do not update; every VMM is told to abort. Answer:
    /// [`FromAgent::Done`].
    Cancel,
}

/// What an update is to do ([`ToAgent::Update`], [`ToAgent::CheckUpdate`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// The kernel to kexec into, which the agent loads (`kexec_file_load()`). An update
    /// without it is refused; a check without it checks the rest.
    pub kernel: Option<String>,
    /// Its initramfs.
    pub initrd: Option<String>,
    /// Its command line; `None`: this kernel's.
    pub cmdline: Option<String>,
    /// How long the VMMs have to become ready.
    pub timeout_ms: u64,
    /// Set only by clients of before [`ToAgent::CheckUpdate`], whose dry run was this field of
    /// `update`: an agent refuses an update that has it rather than run it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// A message from the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// The answer to [`ToAgent::Hello`].
    Hello {
        /// The [`PROTOCOL_VERSION`] of the agent.
        version: u32,
    },
    /// The session's fd is attached.
    Session {
        /// It came from the previous kernel (the VMM resumes its guest from it).
        retrieved: bool,
    },
    /// What the agent knows.
    Status(Status),
    /// Every VMM is ready and the kernel loaded: send [`ToAgent::Commit`] or
    /// [`ToAgent::Cancel`].
    Armed {
        /// The VMMs that are ready.
        vmms: Vec<String>,
    },
    /// The answer to [`ToAgent::CheckUpdate`]: the update would prepare these VMMs.
    WouldUpdate {
        /// The VMMs it would tell to prepare.
        vmms: Vec<String>,
        /// Whether a kernel is loaded for kexec (an update without a kernel needs one).
        kernel_loaded: bool,
    },
    /// A request that needed no other answer succeeded.
    Done,
    /// A request failed.
    Error {
        /// The errno that says best what happened.
        errno: i32,
        /// What happened.
        message: String,
    },
    /// Event for a VMM: an update is starting, get ready.
    Prepare,
    /// Event for a VMM: the update will not happen.
    Abort {
        /// Why.
        reason: String,
    },
    /// A message of a later version of the protocol, which this side does not know.
    #[serde(other)]
    Unknown,
}

/// One VMM as the agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmStatus {
    /// Its session's name.
    pub name: String,
    /// Its process ID.
    pub pid: u32,
    /// What it last reported.
    pub state: VmmState,
    /// Its last detail.
    pub detail: String,
    /// Its session came from the previous kernel.
    pub retrieved: bool,
    /// The agent holds a session for it.
    pub has_session: bool,
}

/// The answer to [`ToAgent::Status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The connected VMMs.
    pub vmms: Vec<VmmStatus>,
    /// Sessions the previous kernel preserved that no VMM has asked for yet.
    pub incoming: Vec<String>,
    /// Those of them the agent retrieved and holds for the next VMM that asks: the VMM they
    /// were retrieved for went away before it got them or before it released them, or they
    /// belong to no user and a user asked (they are lost if the agent stops).
    #[serde(default)]
    pub kept: Vec<String>,
    /// The previous kernel's agent handed over what this agent cannot read: updates wait
    /// until an operator forgets [`AGENT_SESSION`].
    #[serde(default)]
    pub handover_unread: bool,
    /// VMs whose guests were lost: the previous kernel's session could not be taken over,
    /// or their VMM died while resuming from it.
    pub lost: Vec<String>,
    /// `idle`, `preparing`, `armed` or `committing`.
    pub phase: String,
}

/// What the agent preserves about itself across the kexec (in [`AGENT_SESSION`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    /// The format: [`HANDOVER_VERSION`] (absent from an older agent's, which wrote the first).
    #[serde(default = "first_version")]
    pub version: u32,
    /// The sessions of the VMMs that were ready.
    pub sessions: Vec<String>,
    /// The user each of those VMs belongs to (absent from an older agent's handover).
    #[serde(default)]
    pub owners: BTreeMap<String, u32>,
}

impl Default for Handover {
    fn default() -> Self {
        Self {
            version: HANDOVER_VERSION,
            sessions: Vec::new(),
            owners: BTreeMap::new(),
        }
    }
}

/// The version of a format written before versions were.
pub fn first_version() -> u32 {
    1
}

/// The version of a format kept across a kexec or a restart; a record written before versions
/// were is of the first.
#[derive(Deserialize)]
struct Versioned {
    #[serde(default = "first_version")]
    version: u32,
}

/// Decodes `what`, which carries a `version` field, refusing a version later than `known`
/// before anything else of it is read (a later format may not parse as this one, or parse and
/// mean something else).
pub fn decode_versioned<T: for<'a> Deserialize<'a>>(
    buf: &[u8],
    known: u32,
    what: &str,
) -> Result<T, String> {
    let v: Versioned =
        serde_json::from_slice(buf).map_err(|e| format!("{what} is not readable: {e}"))?;
    if v.version > known {
        return Err(format!(
            "{what} is of format {}, later than this program reads (up to {known})",
            v.version
        ));
    }
    serde_json::from_slice(buf).map_err(|e| format!("{what} is not readable: {e}"))
}

/// Encodes a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types cannot fail: no maps with non-string keys, no custom impls.
    serde_json::to_vec(msg).expect("protocol messages serialize")
}

/// Decodes a message, refusing one that is not JSON of the expected type.
pub fn decode<T: for<'a> Deserialize<'a>>(buf: &[u8]) -> Result<T, String> {
    serde_json::from_slice(buf).map_err(|e| format!("not a message of the protocol: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            ToAgent::Hello { version: 1 },
            ToAgent::Session {
                name: "vm1".into(),
                pid: 42,
            },
            ToAgent::State {
                state: VmmState::Running,
                detail: "heartbeat 4".into(),
            },
            ToAgent::Ready,
            ToAgent::NotReady { reason: "x".into() },
            ToAgent::Update(UpdateRequest {
                kernel: Some("/kernel".into()),
                timeout_ms: 10,
                ..Default::default()
            }),
            ToAgent::CheckUpdate(UpdateRequest {
                cmdline: Some("liveupdate=on".into()),
                timeout_ms: 10,
                ..Default::default()
            }),
            ToAgent::GiveBack,
            ToAgent::Commit,
        ];
        for m in msgs {
            assert_eq!(decode::<ToAgent>(&encode(&m)).unwrap(), m);
        }
        let a = FromAgent::Abort { reason: "r".into() };
        assert_eq!(decode::<FromAgent>(&encode(&a)).unwrap(), a);
        // A message type of a later version decodes as Unknown, so that it can be skipped.
        assert_eq!(
            decode::<FromAgent>(br#"{"type":"defragment","how":1}"#).unwrap(),
            FromAgent::Unknown
        );
    }

    #[test]
    fn the_wire_format_is_plain_json() {
        assert_eq!(
            encode(&ToAgent::Session {
                name: "vm1".into(),
                pid: 7
            }),
            br#"{"op":"session","name":"vm1","pid":7}"#
        );
        assert_eq!(encode(&FromAgent::Prepare), br#"{"type":"prepare"}"#);
        // An older client's dry run is not read as an update.
        let old = concat!(
            r#"{"op":"update","kernel":"/k","initrd":null,"cmdline":null,"#,
            r#""timeout_ms":1,"dry_run":true}"#
        );
        let old: ToAgent = decode(old.as_bytes()).unwrap();
        assert!(matches!(
            old,
            ToAgent::Update(UpdateRequest { dry_run: true, .. })
        ));
        assert_eq!(
            encode(&ToAgent::CheckUpdate(UpdateRequest {
                timeout_ms: 5,
                ..Default::default()
            })),
            br#"{"op":"check_update","kernel":null,"initrd":null,"cmdline":null,"timeout_ms":5}"#
        );
        let s: ToAgent = decode(br#"{"op":"state","state":"ready","detail":""}"#).unwrap();
        assert_eq!(
            s,
            ToAgent::State {
                state: VmmState::Ready,
                detail: String::new()
            }
        );
    }

    #[test]
    fn formats_later_than_known_are_refused_before_they_are_read() {
        let h = Handover {
            sessions: vec!["vm1".into()],
            ..Default::default()
        };
        let buf = encode(&h);
        assert_eq!(
            decode_versioned::<Handover>(&buf, HANDOVER_VERSION, "x").unwrap(),
            h
        );
        // Unversioned: the first format.
        let old: Handover =
            decode_versioned(br#"{"sessions":["a"]}"#, HANDOVER_VERSION, "x").unwrap();
        assert_eq!(old.version, 1);
        // A later format, even one that would parse as this one.
        let e = decode_versioned::<Handover>(
            br#"{"version":2,"sessions":["a"]}"#,
            HANDOVER_VERSION,
            "the handover",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "the handover is of format 2, later than this program reads (up to 1)"
        );
        // One that would not.
        let e = decode_versioned::<Handover>(br#"{"version":3,"sessions":7}"#, 1, "h").unwrap_err();
        assert!(e.contains("format 3"), "{e}");
        for bad in [
            &b""[..],
            b"[]",
            br#"{"version":"two"}"#,
            br#"{"sessions":7}"#,
        ] {
            let e = decode_versioned::<Handover>(bad, 1, "h").unwrap_err();
            assert!(e.starts_with("h is not readable"), "{e}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"{",
            br#"{"op":"reboot"}"#,
            br#"{"op":"session","name":"x"}"#,
            br#"{"op":"state","state":"dancing","detail":""}"#,
        ] {
            assert!(decode::<ToAgent>(bad).is_err(), "{bad:?}");
        }
    }
}
