"""The email worker: renders `email.requested` jobs from templates and hands them to SMTP (or, in
embedded mode without SMTP, writes them as `.eml` files), rate-limited per recipient domain.

Not a gRPC service: it is a consumer of the event bus, and it reports each outcome as an
`EmailSent` (or, through the consumer framework's dead-lettering, an `EmailFailed`).
"""
