"""Stable Diffusion teachers (diffusers model folders), one teacher family:
`family.DiffusersFamily`."""
