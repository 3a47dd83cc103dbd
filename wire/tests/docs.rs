//! `docs/protocol.md` cannot drift from the crate: every request and push type, error code and
//! close code the crate defines must be documented there.

use talkgroup_wire::{Code, close, push, request};

const DOC: &str = include_str!("../../docs/protocol.md");

fn undocumented<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|name| !DOC.contains(&format!("`{name}`")))
        .collect()
}

#[test]
fn every_request_and_push_type_is_documented() {
    let missing = undocumented(request::KNOWN.iter().chain(push::KNOWN).copied());
    assert!(missing.is_empty(), "not in docs/protocol.md: {missing:?}");
}

#[test]
fn every_error_code_is_documented() {
    let missing = undocumented(Code::ALL.iter().map(|c| c.as_str()));
    assert!(missing.is_empty(), "not in docs/protocol.md: {missing:?}");
}

#[test]
fn every_close_code_is_documented() {
    let codes: Vec<String> = close::ALL.iter().map(u16::to_string).collect();
    let missing = undocumented(codes.iter().map(String::as_str));
    assert!(missing.is_empty(), "not in docs/protocol.md: {missing:?}");
}
