package org.apache.beam.sdk.util.construction.resources;

import io.github.classgraph.ClassGraph;
import java.io.File;
import java.util.Arrays;
import java.util.List;
import java.util.stream.Collectors;

/**
 * Beam's detector of the jars to stage, shadowed in kflift's job-server jar: the same, but classpath
 * entries under a prefix of system property {@code beam.stage.exclude.prefixes} (':'-separated) stay
 * behind. $SPARK_HOME/jars is on every Spark worker already; without this Beam ships all 250 of them
 * to the executors for every job.
 */
public class ClasspathScanningResourcesDetector implements PipelineResourcesDetector {

  private transient ClassGraph classGraph;

  public ClasspathScanningResourcesDetector(ClassGraph classGraph) {
    this.classGraph = classGraph;
  }

  @Override
  public List<String> detect(ClassLoader classLoader) {
    List<File> classpathContents =
        classGraph.disableNestedJarScanning().addClassLoader(classLoader).scan(1).getClasspathFiles();
    String prop = System.getProperty("beam.stage.exclude.prefixes", "");
    List<String> prefixes =
        Arrays.stream(prop.split(":")).filter(s -> !s.isEmpty()).collect(Collectors.toList());
    return classpathContents.stream()
        .map(File::getAbsolutePath)
        .filter(p -> prefixes.stream().noneMatch(p::startsWith))
        .collect(Collectors.toList());
  }
}
