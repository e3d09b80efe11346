-- Known labels per class over the whole prediction folder: how many positives and negatives each
-- class of the vocabulary has (0 when none). `dart eval` warns when a class has no negative (its AP
-- is 1 whatever the scores) or no positive (it has no AP). No variables.
SELECT v.class_index, v.class_id, v.class_name, v.unseen,
       count(l.label) FILTER (WHERE l.label = 1) AS positives,
       count(l.label) FILTER (WHERE l.label = -1) AS negatives
FROM vocab v LEFT JOIN labels l USING (class_id)
GROUP BY v.class_index, v.class_id, v.class_name, v.unseen
ORDER BY v.class_index;
