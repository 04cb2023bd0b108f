//! `hearth-init`: the guest agent, /init of hearth container VMs and machines.

fn main() {
    hearth::agent::init::main()
}
