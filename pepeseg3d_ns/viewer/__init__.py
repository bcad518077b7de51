"""nerfstudio viewer integration of pepe-contrast: click-to-segment controls (:mod:`.controls`)."""
