"""The embedded offline world: a procedurally generated region with imagery, sounds, captions and truth."""
