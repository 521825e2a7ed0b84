"""Model families (stage 1 keypoints, stage 2 grading) and their shared registry."""
