//! OAuth 2.1 as Portcullis speaks it. `client`: the gateway as the OAuth client of upstream
//! servers (discovery, registration, the token, PAR and revocation endpoints, and the
//! `WWW-Authenticate` challenges they send). The `vault` builds connections on it. The
//! gateway's own authorization server will stand beside it as `server`.

pub mod client;
