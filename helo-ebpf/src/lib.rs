//! Empty on purpose: the program is the `helo-ebpf` binary (src/main.rs), built for the BPF
//! target by helo-agent's build script. This library target exists so that helo-agent can name
//! the crate as a build dependency, which makes cargo rebuild the agent when the program changes.
#![no_std]
